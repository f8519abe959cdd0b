# Sourced by the scripts that measure an earlier commit beside this tree (compare-builds,
# bench-gateway with GW_REV):
#
#   build_rev REV DIR PACKAGE...   builds PACKAGEs' binaries (each named as its package) at
#                                  commit REV and copies them to DIR
#
# The build runs in a worktree at REV, into this tree's target directory: the dependencies are
# shared, only framecast's crates build again. Both trees' crates get the same artifact names
# and cargo compares sources by time, so framecast's release artifacts are removed before and
# after it: neither tree's is taken for the other's (build this tree's after).
build_rev() {
  local rev=$1 dir=$2
  shift 2
  local worktree ours p args=()
  worktree=$(mktemp -d)
  git worktree add --detach "$worktree" "$rev" >/dev/null
  ours=$(cargo metadata --no-deps --format-version 1 \
    | python3 -c 'import json, sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
  for p in "$@"; do args+=(-p "$p"); done
  # shellcheck disable=SC2086 # one word per flag
  cargo clean --release $ours
  (cd "$worktree" && CARGO_TARGET_DIR="$OLDPWD/target" cargo build --release --bins "${args[@]}")
  mkdir -p "$dir"
  for p in "$@"; do cp "target/release/$p" "$dir/"; done
  # shellcheck disable=SC2086
  cargo clean --release $ours
  git worktree remove --force "$worktree"
}
