# Shared by .ci/run and .ci/lock: the pip that installs CI's environments, and how an environment is compared
# with its lock file (.ci/locks/<name>.txt: every distribution but pip and the editable gradprobe, as
# `pip freeze --all` writes them).
PIP_VERSION=26.3

# freeze PYTHON: the environment's distributions in lock-file form, sorted
freeze() {
    "$1" -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -iv '^pip==' | LC_ALL=C sort -f
}

# names: the distribution names of lock-file lines on stdin, sorted as comm expects
names() {
    cut -d= -f1 | LC_ALL=C sort
}

# stacks: the lines of .ci/stacks, comments left out
stacks() {
    grep -v '^\s*\(#\|$\)' .ci/stacks
}

# check_lock PYTHON NAME: fail, naming each difference, unless the environment holds exactly .ci/locks/NAME.txt
check_lock() {
    local diff
    if ! diff=$(diff <(freeze "$1") <(LC_ALL=C sort -f ".ci/locks/$2.txt")); then
        echo "the $2 environment differs from .ci/locks/$2.txt ('<' installed, '>' locked):" >&2
        echo "$diff" | grep '^[<>]' >&2
        echo "run .ci/lock to re-resolve the pins deliberately, then state the tested versions in README.md" >&2
        return 1
    fi
}
