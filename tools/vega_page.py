"""Write the HTML template of `dvc plots show` / `dvc plots diff` with vega, vega-lite and vega-embed inside it.

    npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    python -m tools.vega_page vega-5.33.1.tgz vega-lite-5.23.0.tgz vega-embed-6.29.0.tgz

DVC's own page loads the three libraries from a CDN, so offline it stays blank. This one carries their minified
builds inline (`.dvc/config`'s `plots.html_template` points at it), so a page DVC writes draws anywhere, moved or
mailed included. Not a pipeline stage: rerun it only to change the versions (`vendor/vega/README.md`).
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

PAGE = Path("vendor/vega/plots.html")
# the libraries in the order the page must load them, each with its minified build inside the npm package
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
# what DVC fills in (dvc_render.html.HTML): the plots; no `{scripts}`, which would bring the CDN's tags back
PLOTS_PLACEHOLDER = "{plot_divs}"


def read_package(tarball: Path) -> tuple[str, str, str]:
    """`(name, version, minified build)` of an npm tarball of one of `BUILDS`."""
    with tarfile.open(tarball) as archive:
        manifest = json.loads(archive.extractfile("package/package.json").read())  # type: ignore[union-attr]
        name = manifest["name"]
        if name not in BUILDS:
            raise ValueError(f"{tarball}: package {name!r} is none of {sorted(BUILDS)}")
        code = archive.extractfile(f"package/{BUILDS[name]}").read().decode("utf-8")  # type: ignore[union-attr]
    # the source map is not shipped: without the line no browser asks for it
    lines = [line for line in code.splitlines() if not line.startswith("//# sourceMappingURL=")]
    return name, manifest["version"], "\n".join(lines)


def page(libraries: dict[str, tuple[str, str]]) -> str:
    """The template: `libraries` (`{name: (version, code)}`) inline in `BUILDS`' order, then DVC's plots.

    Fails on code that would end its `<script>` element early or that holds one of DVC's placeholders.
    """
    scripts = []
    for name in BUILDS:
        version, code = libraries[name]
        for forbidden in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if forbidden in code:
                raise ValueError(f"{name} {version} holds {forbidden!r}: it cannot go inline in the template")
        scripts.append(f"<!-- {name} {version} (BSD-3-Clause, vendor/vega/README.md) -->\n<script>{code}</script>")
    joined = "\n".join(scripts)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>DVC Plot</title>\n'
        f"{joined}\n<style>table {{ border-spacing: 15px; }}</style>\n</head>\n<body>\n"
        f"{PLOTS_PLACEHOLDER}\n</body>\n</html>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarballs", type=Path, nargs=len(BUILDS), help="npm tarballs of vega, vega-lite, vega-embed")
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args()
    libraries = {}
    for tarball in args.tarballs:
        name, version, code = read_package(tarball)
        libraries[name] = (version, code)
    missing = sorted(set(BUILDS) - set(libraries))
    if missing:
        raise SystemExit(f"missing the tarball of {', '.join(missing)}")
    args.out.write_text(page(libraries), encoding="utf-8")
    print(f"wrote {args.out}: " + ", ".join(f"{name} {version}" for name, (version, _) in libraries.items()))


if __name__ == "__main__":
    main()
