"""``python -m atman_vllm.cli``: the same as the ``atman-vllm`` console script."""

from . import console_main

console_main()
