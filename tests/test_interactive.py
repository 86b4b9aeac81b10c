"""explore(): one output with a live widget view for Jupyter/Colab and a PNG for the site."""

import base64

import ipywidgets
import matplotlib
import matplotlib.pyplot as plt
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from transformer_book.interactive import explore

matplotlib.use("Agg")


def test_one_output_carries_the_widget_and_a_static_figure(monkeypatch):
    InteractiveShell.instance()
    calls, made = [], []

    class Recorded(ipywidgets.interactive):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ipywidgets, "interactive", Recorded)

    def plot(d_k):
        calls.append(d_k)
        plt.plot([0, 1], [0, d_k])

    slider = ipywidgets.IntSlider(value=3, min=1, max=10)
    with capture_output() as captured:
        result = explore(plot, d_k=slider)
    assert result is None  # nothing for Jupyter to display a second time
    bundles = [o.data for o in captured.outputs if "image/png" in o.data]
    assert len(bundles) == 1
    bundle = bundles[0]
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    view = bundle["application/vnd.jupyter.widget-view+json"]
    (ui,) = made
    assert view["model_id"] == ui.model_id and slider in ui.children
    assert calls[0] == 3  # the static figure is drawn at the slider's starting value

    slider.value = 7  # moving the slider redraws with the new value
    assert calls[-1] == 7
