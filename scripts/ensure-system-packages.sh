#!/usr/bin/env bash
# Installs the Debian packages the system and its tests run (only those missing).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Cairo: the QR test renders the served SVG with cairosvg, which loads libcairo.so.2.
/sbin/ldconfig -p 2>/dev/null | grep -q 'libcairo\.so\.2' || need+=(libcairo2)
for extra in "$@"; do
  case "$extra" in
    chromium) command -v chromium >/dev/null 2>&1 || need+=(chromium) ;;
    nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx) ;;
    # The C push server `make bench-peer` measures the gateway against (an nginx module).
    nchan) [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need+=(libnginx-mod-nchan) ;;
    # promtool checks the alert rules offline (tests/test_monitoring.py); Debian ships it in
    # the server's package. Installing it starts nothing where policy-rc.d forbids it (containers);
    # elsewhere Debian starts a Prometheus on :9090, which nothing here uses.
    promtool) command -v promtool >/dev/null 2>&1 || need+=(prometheus) ;;
  esac
done
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
