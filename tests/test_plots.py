"""`dvc plots show` with the project's template (vendor/vega/plots.html): the page draws both plots offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune.evaluation.base_vs_tuned import BAR_COLUMNS
from tools.vega_page import BUILDS, page

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

# every plotted mark's items by mark type, per plot, once vega-embed has drawn them (axes and legends left out)
DRAWN_MARKS = """
async () => {
  const results = await Promise.all(window.__embeds);
  return results.map((result) => {
    const counts = {};
    const walk = (node) => {
      if (node.marktype && node.role === "mark") {
        counts[node.marktype] = (counts[node.marktype] || 0) + (node.items || []).length;
      }
      (node.items || []).forEach(walk);
    };
    walk(result.view.scenegraph().root);
    return counts;
  });
}
"""
# every bar drawn, with its data and place (x, width: along the value axis; y, height: across it), per plot
DRAWN_BARS = """
async () => {
  const results = await Promise.all(window.__embeds);
  return results.map((result) => {
    const bars = [];
    const walk = (node) => {
      if (node.marktype === "rect" && node.role === "mark") {
        (node.items || []).forEach((item) => bars.push({...item.datum, x: item.x, width: item.width, y: item.y,
                                                         height: item.height, fill: item.fill}));
      }
      (node.items || []).forEach(walk);
    };
    walk(result.view.scenegraph().root);
    return bars;
  });
}
"""
# keeps the promise of each vegaEmbed call the page makes, so that the test can wait for the drawing and count marks
RECORD_EMBEDS = """
window.__embeds = [];
let embed;
Object.defineProperty(window, "vegaEmbed", {
  configurable: true,
  set(value) { embed = value; },
  get() { return embed && ((...args) => { const p = embed(...args); window.__embeds.push(p); return p; }); },
});
"""


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Path:
    """`dvc plots show` in a git repo with this project's dvc.yaml and .dvc/config, and results as train and
    evaluate write them: 30 training steps, 3 held-out evaluations, 8 bars: loss, perplexity and two 0-1 scores of
    base and tuned."""
    repo = tmp_path_factory.mktemp("plots")
    template = ".dvc/plots/base_vs_tuned.json"  # the bars' vega-lite template
    for name in ("dvc.yaml", ".dvc/config", ".dvc/.gitignore", template, "vendor/vega/plots.html"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, repo / name)
    write_csv(repo / "metrics/train_loss.csv", "step,loss", [f"{s},{3 - s / 20}" for s in range(1, 31)])
    write_csv(repo / "metrics/eval_loss.csv", "step,eval_loss", ["10,2.8", "20,2.3", "30,2.0"])
    bars = ["loss,loss,base,3.1", "loss,loss,tuned,2.0", "perplexity,perplexity,base,22.2"]
    bars += ["perplexity,perplexity,tuned,7.4", "score,rouge_l,base,0.1", "score,rouge_l,tuned,0.3"]
    bars += ["score,eos,base,0.0", "score,eos,tuned,0.5"]
    write_csv(repo / "metrics/evaluate_bars.csv", ",".join(BAR_COLUMNS), bars)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], cwd=repo, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "WARNING" not in shown.stdout + shown.stderr and "ERROR" not in shown.stdout + shown.stderr
    return repo / "out" / "index.html"


def test_the_template_holds_the_three_libraries_and_no_cdn(plots_page: Path) -> None:
    html = plots_page.read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in html and "<script src" not in html
    assert all(f"<!-- {name} " in html for name in BUILDS)


def test_page_refuses_code_that_would_end_its_script_early() -> None:
    libraries = dict.fromkeys(BUILDS, ("1.0.0", "var a = 1;"))
    assert "{plot_divs}" in page(libraries) and "{scripts}" not in page(libraries)
    with pytest.raises(ValueError, match="vega-lite 1.0.0 holds '</script'"):
        page(libraries | {"vega-lite": ("1.0.0", "'</script>'")})


def test_the_page_draws_both_plots_with_the_network_blocked(plots_page: Path, browser: Any) -> None:
    asked: list[str] = []
    browser.route("http*://**", lambda route: (asked.append(route.request.url), route.abort()))
    browser.set_offline(True)
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.add_init_script(RECORD_EMBEDS)
    try:
        tab.goto(plots_page.as_uri())
        drawn = tab.evaluate(DRAWN_MARKS)
        bars = next(plot for plot in tab.evaluate(DRAWN_BARS) if plot)
    finally:
        tab.close()
        browser.set_offline(False)
        browser.unroute("http*://**")
    assert not errors and not asked, (errors, asked)
    assert len(drawn) == 2, json.dumps(drawn)
    loss, rects = sorted(drawn, key=lambda counts: "rect" in counts)
    assert loss.get("line", 0) >= 30 + 3, loss  # a point per training step and per held-out evaluation
    assert rects.get("rect") == 8, rects  # a bar per measure and model
    bar = {(b["measure"], b["model"]): b for b in bars}
    for (measure, model), drawn_bar in bar.items():  # the 0-1 scores on an axis from 0 to 1, 480 px wide (DVC
        # passes the CSV's values on as text)
        if drawn_bar["panel"] == "score":
            assert drawn_bar["width"] == pytest.approx(480 * float(drawn_bar["value"]), abs=1), (measure, model)
    # loss and perplexity each on its own axis: the loss is not a sliver beside a perplexity of 22
    assert bar["loss", "base"]["width"] > 0.6 * bar["perplexity", "base"]["width"] > 0
    for measure in ("loss", "perplexity", "rouge_l", "eos"):  # base and tuned side by side: tuned right below
        base, tuned = bar[measure, "base"], bar[measure, "tuned"]
        assert tuned["y"] - (base["y"] + base["height"]) == pytest.approx(0, abs=1) and base["height"] > 0, measure
        assert base["fill"] != tuned["fill"]
    rouge, eos = bar["rouge_l", "tuned"], bar["eos", "base"]  # and apart from the next measure's bars
    assert eos["y"] >= rouge["y"] + rouge["height"] + 1
