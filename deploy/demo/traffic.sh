#!/bin/sh
# Demo traffic for the compose stack: subscribes eight tenants to the seed plans, then
# posts batches of usage events to the ingest gateway until stopped. Every event has a
# fresh id; the subscriptions have fixed ids, so a restart re-sends them harmlessly
# (consumers dedup by tenant and event id).
set -eu
GATEWAY="${GATEWAY:-http://ingest:8080/v1/events}"
TOKEN="$(cat "${TOKEN_FILE:-/run/secrets/demo-token}")"
PLANS="free starter pro enterprise free starter pro enterprise"

post() {
  curl -fsS -o /dev/null -X POST "$GATEWAY" -H "Authorization: Bearer $TOKEN" \
    -H "Content-Type: application/cloudevents-batch+json" --data-binary "$1"
}

year=$(date -u +%Y); month=$(date -u +%m); m=${month#0}
if [ "$m" -eq 12 ]; then next="$((year + 1))-01"; else next="$year-$(printf %02d $((m + 1)))"; fi
start="$year-$month-01T00:00:00Z"; end="$next-01T00:00:00Z"

batch="["; i=0
for plan in $PLANS; do
  i=$((i + 1)); tenant="tenant-$(printf %02d $i)"
  [ "$i" -gt 1 ] && batch="$batch,"
  batch="$batch{\"specversion\":\"1.0\",\"id\":\"demo-sub-$tenant-$year$month\",\"source\":\"svc/demo\",
    \"type\":\"tally.subscription.created.v1\",\"subject\":\"$tenant\",\"time\":\"$start\",
    \"data\":{\"plan_id\":\"$plan\",\"period_start\":\"$start\",\"period_end\":\"$end\"}}"
done
until post "$batch]"; do echo "waiting for the gateway"; sleep 2; done
echo "subscribed 8 tenants"

# Usage: 8 requests a second, one tenant each, 25 events of mixed meters.
while true; do
  for t in 1 2 3 4 5 6 7 8; do
    tenant="tenant-0$t"; now=$(date -u +%Y-%m-%dT%H:%M:%SZ); batch="["
    for n in $(seq 1 25); do
      case $((n % 5)) in
        0) meter=executions; qty=1 ;;
        1) meter=tokens; qty=$((500 + n * 97)) ;;
        *) meter=api_calls; qty=1 ;;
      esac
      [ "$n" -gt 1 ] && batch="$batch,"
      batch="$batch{\"specversion\":\"1.0\",\"id\":\"$(cat /proc/sys/kernel/random/uuid)\",
        \"source\":\"svc/demo\",\"type\":\"tally.usage.v1\",\"subject\":\"$tenant\",
        \"time\":\"$now\",\"data\":{\"meter\":\"$meter\",\"quantity\":\"$qty\"}}"
    done
    post "$batch]" || echo "post failed (the gateway answers 503 while Kafka is away)"
  done
  sleep 1
done
