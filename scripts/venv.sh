# Sourced by scripts/test and scripts/quickstart: makes ./.venv and installs vaekit with the given extra.
# Works on a fresh clone with only the package registries reachable.
install_vaekit() {
    local extra=$1
    [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # torchvision (needed by lpips) only imports beside a matching torch build.
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip install -q -e ".[$extra]"
}
