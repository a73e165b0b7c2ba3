# Sourced by the launch scripts: `usage [STATUS]` prints the running script's header comment (its
# usage) and exits with STATUS (default 2); `help_requested "$@"` is true for a first argument
# -h or --help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
help_requested() { [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; }
