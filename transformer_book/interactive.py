"""Sliders in Jupyter and Colab, a static figure on the website.

``explore(plot, d_k=IntSlider(...))`` displays one output that carries two
representations: a live ``ipywidgets.interactive`` view (chosen by Jupyter and Colab)
and a PNG of ``plot`` at the sliders' starting values (chosen by the static site,
whose ``_config.yml`` gives widget views no priority). So the same place shows sliders
where a kernel is running and a figure where none is.
"""

from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt


def _png(plot, values: dict) -> str:
    plot(**values)
    figure = plt.gcf()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def explore(plot, **sliders):
    """Show ``plot(**values)`` with one slider per keyword (ipywidgets widgets).

    ``plot`` draws on the current matplotlib figure and returns nothing. ``explore``
    returns nothing either, so a call ending a cell does not display the widget twice.
    """
    from IPython.display import display

    values = {name: widget.value for name, widget in sliders.items()}
    png = _png(plot, values)
    try:
        import ipywidgets
    except ImportError:  # no widgets installed: the static figure is all we can show
        display({"image/png": png, "text/plain": "<figure>"}, raw=True)
        return

    def draw(**kwargs):
        plot(**kwargs)
        plt.show()

    ui = ipywidgets.interactive(draw, **sliders)
    view = {"version_major": 2, "version_minor": 0, "model_id": ui.model_id}
    display(
        {
            "application/vnd.jupyter.widget-view+json": view,
            "image/png": png,
            "text/plain": f"interactive figure ({', '.join(sliders)})",
        },
        raw=True,
    )
