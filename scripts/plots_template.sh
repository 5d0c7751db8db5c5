#!/usr/bin/env bash
# Build .dvc/plots_offline.html: DVC's HTML page template with Vega, Vega-Lite and Vega-Embed
# inlined (installed from the npm registry at the versions scripts/vega/package-lock.json pins),
# so that `dvc plots show` / `dvc plots diff` pages render without a network; then point this
# clone's DVC at it (`dvc config --local plots.html_template`). `make env` runs it when npm exists.
# The template has {plot_divs} and {refresh_tag} but no {scripts}, where dvc-render would put
# its CDN <script> tags.
set -euo pipefail
root="$(dirname "$(dirname "$(realpath "${BASH_SOURCE[0]}")")")"
if ! command -v npm >/dev/null; then
    echo "plots_template.sh: npm not found: \`dvc plots show\` pages will load Vega from a CDN" \
         "(install Node.js + npm and run \`make plots-template\`, or use \`dvc plots show --json\`)" >&2
    exit 1
fi
npm ci --prefix "$root/scripts/vega" --no-audit --no-fund --silent
"${PYTHON:-python3}" - "$root/scripts/vega/node_modules" "$root/.dvc/plots_offline.html" <<'PY'
import os, pathlib, sys, tempfile
modules, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
scripts = []
for rel in ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js",
            "vega-embed/build/vega-embed.min.js"):
    js = (modules / rel).read_text(encoding="utf-8")
    for bad in ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad in js:   # would end the <script> block early, or be filled in by dvc-render
            sys.exit(f"plots_template.sh: {rel} contains {bad!r}; cannot inline it")
    scripts.append(f"<script>/* {rel} */\n{js}\n</script>")
page = ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n"
        "<title>DVC Plot</title>\n" + "\n".join(scripts) +
        "\n<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n"
        "</body>\n</html>\n")
fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-plots-")
with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(page)
os.replace(tmp, out)
print(f"{out}: {out.stat().st_size:,} bytes")
PY
cd "$root" && dvc config --local plots.html_template plots_offline.html
