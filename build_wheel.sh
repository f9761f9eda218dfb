#!/usr/bin/env bash
# Build the offline bundle for a Kaggle notebook (no internet there):
#
#   OUT/wheels/   our wheel + the cp312 manylinux wheels Kaggle's image lacks
#                 (timm-3d, pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)
#   OUT/weights/  a copy of a weights directory with its manifest
#
# Upload OUT as a Kaggle dataset, then in the notebook:
#   !pip install --no-index --find-links /kaggle/input/<dataset>/wheels "rsna-infer[dicom]"
#
# Usage: ./build_wheel.sh [-h] [--no-download] [--manifest NAME] [WEIGHTS_DIR [OUT_DIR]]
#   WEIGHTS_DIR  directory holding the manifest and the files it lists (default rsna_infer/demo/);
#                `rsna-infer train --merge ... --out DIR` writes such a directory, taken as is
#   OUT_DIR      where the bundle goes (default dist/bundle; its wheels/ and weights/ are replaced)
#   --manifest   manifest file name inside WEIGHTS_DIR (default weights_manifest.json, else the
#                only *.json there)
#   --no-download  skip fetching third-party wheels (offline rebuild of our wheel + weights)
# Environment: PYTHON (default python3), KAGGLE_PYTHON_VERSION (default 3.12), BUNDLE_NO_DOWNLOAD=1
#   (same as --no-download),
#   KAGGLE_PLATFORMS (space-separated wheel platform tags Kaggle's glibc accepts; default every
#   manylinux tag up to glibc 2.35, Kaggle's Ubuntu 22.04 base: pip download matches the tags
#   given literally, and e.g. pylibjpeg-libjpeg 2.5.0 ships only manylinux_2_31/2_34 wheels).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

PYTHON=${PYTHON:-python3}
PY_VERSION=${KAGGLE_PYTHON_VERSION:-3.12}
read -r -a PLATFORMS <<<"${KAGGLE_PLATFORMS:-manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64}"
DOWNLOAD=1
if [[ "${BUNDLE_NO_DOWNLOAD:-0}" == 1 ]]; then DOWNLOAD=0; fi
MANIFEST_NAME=""
POSITIONAL=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --no-download) DOWNLOAD=0; shift ;;
        --manifest) MANIFEST_NAME=${2:?--manifest needs a file name}; shift 2 ;;
        --manifest=*) MANIFEST_NAME=${1#--manifest=}; shift ;;
        -*) echo "build_wheel.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) POSITIONAL+=("$1"); shift ;;
    esac
done
if [[ ${#POSITIONAL[@]} -gt 2 ]]; then
    echo "build_wheel.sh: at most two arguments, WEIGHTS_DIR and OUT_DIR (see --help)" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WEIGHTS_DIR=${POSITIONAL[0]:-$REPO/rsna_infer/demo}
OUT_DIR=${POSITIONAL[1]:-$REPO/dist/bundle}

die() { echo "build_wheel.sh: $*" >&2; exit 1; }

[[ -d "$WEIGHTS_DIR" ]] || die "weights directory $WEIGHTS_DIR does not exist; pass the directory that holds your weights_manifest.json"
WEIGHTS_DIR=$(cd "$WEIGHTS_DIR" && pwd)
if [[ -z "$MANIFEST_NAME" ]]; then
    if [[ -f "$WEIGHTS_DIR/weights_manifest.json" ]]; then
        MANIFEST_NAME=weights_manifest.json
    else
        mapfile -t JSONS < <(cd "$WEIGHTS_DIR" && ls -1 -- *.json 2>/dev/null || true)
        [[ ${#JSONS[@]} -eq 1 ]] || die "$WEIGHTS_DIR holds ${#JSONS[@]} *.json files and no weights_manifest.json; name the manifest with --manifest"
        MANIFEST_NAME=${JSONS[0]}
    fi
fi
[[ -f "$WEIGHTS_DIR/$MANIFEST_NAME" ]] || die "manifest $WEIGHTS_DIR/$MANIFEST_NAME does not exist"

# Every file the manifest names must lie inside the weights directory (so the copy is
# complete) and match its sha256 when one is given: a wrong bundle fails here, not on Kaggle.
# Weights whose sha256 is one of the packaged demo weights' are reported as DEMO wherever
# they were copied (phantom-trained; meaningless on real MRI).
"$PYTHON" - "$WEIGHTS_DIR" "$MANIFEST_NAME" "$REPO/rsna_infer/demo/weights_manifest.json" <<'PY'
import hashlib, json, os, sys
root, name, demo_manifest = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(root, name)) as fh:
    manifest = json.load(fh)
entries = []
def walk(node):
    if isinstance(node, dict):
        if isinstance(node.get("file"), str):
            entries.append(node)
        for value in node.values():
            walk(value)
    elif isinstance(node, list):
        for value in node:
            walk(value)
walk(manifest)
problems = []
demo_hashes = set()
if os.path.isfile(demo_manifest):
    with open(demo_manifest) as fh:
        demo_hashes = {m.get("sha256") for m in json.load(fh).get("models", []) if m.get("sha256")}
demo = []
for entry in entries:
    rel = entry["file"]
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.isabs(rel) or not path.startswith(root + os.sep):
        problems.append(f"{rel}: outside the weights directory")
    elif not os.path.isfile(path):
        problems.append(f"{rel}: missing")
    elif entry.get("sha256"):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest.hexdigest()} does not match the manifest's {entry['sha256']}")
        elif digest.hexdigest() in demo_hashes:
            demo.append(entry.get("name", rel))
if problems:
    sys.exit("build_wheel.sh: manifest " + name + ":\n  " + "\n  ".join(problems))
print(f"manifest {name}: {len(entries)} weight file(s) present" + (", hashes match" if entries else ""))
if demo:
    print(f"build_wheel.sh: NOTE: {len(demo)} of {len(entries)} model(s) are the packaged DEMO weights (by sha256): "
          "trained on phantoms, meaningless on real MRI: " + ", ".join(demo[:8]) + (" ..." if len(demo) > 8 else ""),
          file=sys.stderr)
PY

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
case "$WEIGHTS_DIR/" in "$OUT_DIR"/*) die "weights directory $WEIGHTS_DIR lies inside the output directory $OUT_DIR" ;; esac
rm -rf "$OUT_DIR/wheels" "$OUT_DIR/weights"
mkdir -p "$OUT_DIR/wheels" "$OUT_DIR/weights"

# 1. our wheel, built from a clean copy of the working tree (tracked + untracked, not ignored),
#    so that a stale build/ directory can never leak deleted modules into the wheel.
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [[ -e "$f" ]] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$STAGE")
else
    cp -r "$REPO"/. "$STAGE"
    rm -rf "$STAGE/build" "$STAGE/dist"
fi
echo "building the rsna-infer wheel"
if ! "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT_DIR/wheels" "$STAGE" 2>"$STAGE/.pip-err"; then
    echo "(build without isolation failed, retrying with an isolated build environment)"
    cat "$STAGE/.pip-err" >&2
    "$PYTHON" -m pip wheel -q --no-deps -w "$OUT_DIR/wheels" "$STAGE"
fi

# 2. third-party wheels for Kaggle's Python, pinned to the versions installed here (the ones
#    the tests ran with) when they are installed, else the newest that has a cp312 wheel.
pin() {
    local v
    v=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true)
    if [[ -n "$v" ]]; then echo "$1==$v"; else echo "$1"; fi
}
if [[ $DOWNLOAD -eq 1 ]]; then
    REQS=()
    for pkg in timm-3d pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg; do REQS+=("$(pin "$pkg")"); done
    PLATFORM_ARGS=()
    for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done
    echo "downloading ${REQS[*]} for cp${PY_VERSION/./} (${PLATFORMS[*]})"
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${PLATFORM_ARGS[@]}" --no-deps -d "$OUT_DIR/wheels" "${REQS[@]}"
else
    echo "skipping third-party wheels (--no-download)"
fi

# 3. weights + manifest, relative layout kept (the manifest names files relative to itself).
cp -r "$WEIGHTS_DIR"/. "$OUT_DIR/weights/"
find "$OUT_DIR/weights" -name '__pycache__' -type d -prune -exec rm -rf {} +

echo
echo "bundle ready: $OUT_DIR"
(cd "$OUT_DIR" && find wheels weights -type f -exec du -h {} + | sort -k2)
cat <<EOF

Upload $OUT_DIR as a Kaggle dataset (for example named rsna-infer-bundle), attach it to the
notebook (notebooks/kaggle_submission.ipynb), and run:
  !pip install --no-index --find-links /kaggle/input/rsna-infer-bundle/wheels "rsna-infer[dicom]"
  rsna_infer.predict(ROOT, manifest="/kaggle/input/rsna-infer-bundle/weights/$MANIFEST_NAME", out_csv="submission.csv")
EOF
