#!/usr/bin/env bash
# The browser tests (tests/view/test_ui_browser.py) drive Debian's headless
# Chromium. `make test` runs this first: it installs the packages where it can
# (root with apt-get) and otherwise says why the browser tests will skip.
# It never fails the test run: a machine without Chromium still runs the rest.
set -u
for name in chromium chromium-browser google-chrome; do
    command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests (apt-get)"
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
            >/tmp/atman-install-chromium.log 2>&1; then
        exit 0
    fi
    echo "apt-get could not install chromium (log: /tmp/atman-install-chromium.log): the browser tests will skip"
else
    echo "no chromium, and no root apt-get to install it: the browser tests will skip"
fi
exit 0
