# Shared checks for the launch scripts (sourced, not run).
die() { echo "$(basename "$0"): $*" >&2; exit 2; }

check_positive_int() {  # name value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

check_hostfile() {  # path -> prints the number of hosts; each line "host slots=N"
  local f=$1 n=0 line
  [ -f "$f" ] || die "hostfile '$f' not found"
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}; [ -z "${line//[[:space:]]/}" ] && continue
    [[ "$line" =~ ^[[:space:]]*[A-Za-z0-9._-]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]] \
      || die "hostfile '$f': bad line '$line' (expected 'hostname slots=N')"
    n=$((n + 1))
  done < "$f"
  [ "$n" -gt 0 ] || die "hostfile '$f' lists no hosts"
  echo "$n"
}

check_master() {  # addr port: the address must resolve; the port must be a number
  getent hosts "$1" >/dev/null 2>&1 || [[ "$1" =~ ^[0-9.]+$ ]] || die "master address '$1' does not resolve"
  check_positive_int MASTER_PORT "$2"
}

python_bin() {  # the project's venv when there is one, else python3 on PATH
  if [ -x .venv/bin/python ]; then echo .venv/bin/python; else command -v python3; fi
}
