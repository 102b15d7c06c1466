"""Views of an explanation people look at: terminal (rich), notebook HTML, the web page, interop.

The core imports this package only inside ``ExplainResult``'s display and
conversion methods, so ``atman_vllm.core`` stays free of rendering code;
Captum (torch) and pandas are imported only by the conversions that need them.
"""

from .heatmap import heatmap_png, heatmap_sheet, save_heatmap
from .html import notebook_html, page_html
from .interop import RECORD_COLUMNS, to_captum, to_dataframe, to_records
from .terminal import explanation_group, render_explanation

__all__ = ["RECORD_COLUMNS", "explanation_group", "heatmap_png", "heatmap_sheet", "save_heatmap", "notebook_html", "page_html", "render_explanation",
           "to_captum", "to_dataframe", "to_records"]
