"""Plotly figure builders: pure functions from result objects to figures, shared by the CLI
(``--html``), the explorer and the experiment scripts."""
from probe.figures._html import IMAGE_FORMATS, static_engine, write_html, write_image, write_plotlyjs
from probe.figures.ntk import eigenlearning_figure, ntk_across_training, ntk_spectrum_figure
from probe.figures.training import training_curves

__all__ = ["write_html", "write_plotlyjs", "write_image", "static_engine", "IMAGE_FORMATS", "training_curves",
           "ntk_spectrum_figure", "ntk_across_training", "eigenlearning_figure"]
