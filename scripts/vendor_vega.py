"""Write the offline HTML template for `dvc plots show` (.dvc/plots/offline.html).

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so it is blank on a
machine without internet. This script fetches the versions DVC's page asks for from the
npm registry (development time only), checks them against pinned SHA-512 digests and
inlines their minified builds into a template, with their licences in .dvc/plots/LICENSES.
`.dvc/config` points `plots.html_template` at the template; the page then loads nothing
remote. The output is committed: rerun this only to change the versions.

    python scripts/vendor_vega.py
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots"
REGISTRY = "https://registry.npmjs.org"
# name, version, build file, sha512 of the npm tarball
PACKAGES = (
    (
        "vega",
        "5.20.2",
        "build/vega.min.js",
        "aa61fb683f4618fa6cb157712f5c6071dc536d0cf2454791475e8eb37f39ca6b"
        "d0862c02610340ebe79750f0190d354b7e4d115eee89ce3ea4504e6343cd0457",
    ),
    (
        "vega-lite",
        "5.2.0",
        "build/vega-lite.min.js",
        "631720f0cbd87f11dc1ba05b91a293d2854220c21c135f54bea22c130066c9df"
        "fb8769f35bba119c80fcd53f14ad8ee1a43ac8afac1ad89003393d9d846344af",
    ),
    (
        "vega-embed",
        "6.18.2",
        "build/vega-embed.min.js",
        "c1c0f240f1382796a2083737fecb87e51403beb2a48ee2e487351c6ce2f01243"
        "45f3ffa9a75eed4b426087312f00f35183ee5a1b5fcddb2762c6af0b93774e96",
    ),
)

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {credits}: inlined (BSD-3-Clause, see .dvc/plots/LICENSES) so that the page
         loads nothing remote. Written by scripts/vendor_vega.py. -->
{scripts_inline}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str, version: str, sha512: str) -> tarfile.TarFile:
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    digest = hashlib.sha512(data).hexdigest()
    if digest != sha512:
        raise SystemExit(f"{url}: sha512 {digest} does not match the pinned {sha512}")
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


def main() -> None:
    scripts, credits = [], []
    (OUT / "LICENSES").mkdir(parents=True, exist_ok=True)
    for name, version, build, sha512 in PACKAGES:
        with fetch(name, version, sha512) as archive:
            code = archive.extractfile(f"package/{build}").read().decode()
            licence = archive.extractfile("package/LICENSE").read().decode()
        code = re.sub(r"//# sourceMappingURL=\S+\s*$", "", code)
        for marker in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if marker in code:  # would end the element or be replaced by DVC
                raise SystemExit(f"{name}: its build contains {marker!r}")
        scripts.append(f'    <script type="text/javascript">\n{code}\n    </script>')
        credits.append(f"{name} {version}")
        (OUT / "LICENSES" / f"{name}-{version}.txt").write_text(licence)
    page = PAGE.replace("{{", "\0").replace("}}", "\1")
    page = page.replace("{credits}", ", ".join(credits))
    page = page.replace("{scripts_inline}", "\n".join(scripts))
    page = page.replace("\0", "{").replace("\1", "}")
    (OUT / "offline.html").write_text(page)
    print(f"written {OUT / 'offline.html'} ({len(page) // 1024} KiB): {', '.join(credits)}")


if __name__ == "__main__":
    main()
