"""`dvc plots show` with the project's template (vendor/vega/plots.html): the page draws both plots offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
    evaluate write them: 30 training steps, 3 held-out evaluations, 6 bars."""
    repo = tmp_path_factory.mktemp("plots")
    for name in ("dvc.yaml", ".dvc/config", ".dvc/.gitignore", "vendor/vega/plots.html"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, repo / name)
    write_csv(repo / "metrics/train_loss.csv", "step,loss", [f"{s},{3 - s / 20}" for s in range(1, 31)])
    write_csv(repo / "metrics/eval_loss.csv", "step,eval_loss", ["10,2.8", "20,2.3", "30,2.0"])
    bars = ["loss · base,3.1", "loss · tuned,2.0", "rouge_l · base,0.1", "rouge_l · tuned,0.3"]
    write_csv(repo / "metrics/evaluate_bars.csv", "measure,value", [*bars, "eos · base,0.0", "eos · tuned,0.5"])
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
    finally:
        tab.close()
        browser.set_offline(False)
        browser.unroute("http*://**")
    assert not errors and not asked, (errors, asked)
    assert len(drawn) == 2, json.dumps(drawn)
    loss, bars = sorted(drawn, key=lambda counts: "rect" in counts)
    assert loss.get("line", 0) >= 30 + 3, loss  # a point per training step and per held-out evaluation
    assert bars.get("rect") == 6, bars  # a bar per measure and model
