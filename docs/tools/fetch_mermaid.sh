#!/usr/bin/env bash
# Refresh the committed copy of mermaid's browser bundle (docs/assets/vendor/mermaid/).
#
# The site renders its diagrams with this local copy so that it builds and displays with no
# network (Material would otherwise load mermaid from a CDN). Usage, from the repository root:
#
#   bash docs/tools/fetch_mermaid.sh            # the pinned version below
#   bash docs/tools/fetch_mermaid.sh 11.18.0    # another one (then update VERSION and SHA256 here)
#
# It uses `npm pack`, which downloads the package tarball from the npm registry that npm is set up
# to use, and checks the bundle's SHA-256 when the pinned version is fetched.
set -euo pipefail
VERSION="${1:-11.17.2}"
SHA256="581ed7d74bd9048d0e3a91363927d72ef22942d7722546b27f7cc29e35390eb8"  # of 11.17.2's dist/mermaid.min.js
DEST="$(cd "$(dirname "$0")/../assets/vendor/mermaid" && pwd)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "mermaid@$VERSION" >/dev/null)
tar -xzf "$work"/mermaid-*.tgz -C "$work" package/dist/mermaid.min.js package/LICENSE
if [ "$VERSION" = 11.17.2 ]; then
    echo "$SHA256  $work/package/dist/mermaid.min.js" | sha256sum --check --quiet
fi
cp "$work/package/dist/mermaid.min.js" "$work/package/LICENSE" "$DEST/"
echo "mermaid $VERSION -> $DEST/mermaid.min.js ($(wc -c <"$DEST/mermaid.min.js") bytes)"
