#!/usr/bin/env bash
# Puts one tools/refresh_records.sh call's output (REFRESH=decode) into a GPU's folder of records:
#   FROM: the call's $OUT as fetched here (decode.tar.gz, api.json, paged_peers_p16.json,
#         short_steps.json, logs.tar.gz); GPU: h100 or h200; SHA: the commit the records carry
#         (KVPACK_GIT_COMMIT of the call); OLD: the commit of the records they replace.
# The replaced records move to before_<SHA>/ in decode/, api/ and peers/; the logs land in logs/ as
# records_<name>_<SHA>.<ext> (the API's as api_decode_api_<SHA>.log, the short step's as
# short_steps_<SHA>.*). Moves and copies only: the records are the machine's, never edited.
#
#   bash tools/install_records.sh FROM GPU SHA OLD
set -euo pipefail
cd "$(dirname "$0")/.."
FROM=$1 GPU=$2 SHA=$3 OLD=$4
R=reports/reference/$GPU
[ -d "$R" ] || { echo "no $R" >&2; exit 2; }
[ -f "$FROM/decode.tar.gz" ] || { echo "$FROM has no decode.tar.gz" >&2; exit 2; }
T=$(mktemp -d)
tar xzf "$FROM/decode.tar.gz" -C "$T"
tar xzf "$FROM/logs.tar.gz" -C "$T"
src=$(find "$T/decode" -name 'T*_B*.json' -printf '%h\n' | head -1)
[ -n "$src" ] || { echo "decode.tar.gz holds no decode records" >&2; exit 2; }
mkdir -p "$R/decode/before_$SHA" "$R/api/before_$SHA" "$R/peers/before_$SHA"
git mv -k "$R"/decode/T*_B*.json "$R/decode/append.json" "$R/decode/before_$SHA/" 2>/dev/null || true
cp "$src"/T*_B*.json "$R/decode/"
[ -f "$src/append.json" ] && cp "$src/append.json" "$R/decode/"
if [ -f "$FROM/api.json" ]; then
  git mv -k "$R/api/decode_api.json" "$R/api/before_$SHA/" 2>/dev/null || true
  cp "$FROM/api.json" "$R/api/decode_api.json"
fi
if [ -f "$FROM/paged_peers_p16.json" ]; then
  for f in paged_peers_p16.json bench_paged_peers_p16.log env.txt; do
    git mv -k "$R/peers/$f" "$R/peers/before_$SHA/" 2>/dev/null || true
  done
  cp "$FROM/paged_peers_p16.json" "$R/peers/"
  [ -f "$T/logs/bench_paged_peers_p16.log" ] && cp "$T/logs/bench_paged_peers_p16.log" "$R/peers/"
  [ -f "$T/logs/env.txt" ] && cp "$T/logs/env.txt" "$R/peers/env.txt"  # the machine, and FlashInfer's version
fi
[ -f "$FROM/short_steps.json" ] && cp "$FROM/short_steps.json" "$R/logs/short_steps_$SHA.json"
for f in "$T"/logs/*; do
  b=$(basename "$f")
  case "$b" in
    bench_paged_peers_p16.log|*pip.log|build.log) ;;
    bench_decode_api.log) cp "$f" "$R/logs/api_decode_api_$SHA.log" ;;
    short_steps.log) cp "$f" "$R/logs/short_steps_$SHA.log" ;;
    *.*) cp "$f" "$R/logs/records_${b%.*}_$SHA.${b##*.}" ;;
  esac
done
rmdir "$R/decode/before_$SHA" "$R/api/before_$SHA" "$R/peers/before_$SHA" 2>/dev/null || true
rm -rf "$T"
echo "installed into $R (replaced records, of $OLD, in before_$SHA/)"
git status --short "$R" | head -40
