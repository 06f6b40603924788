#!/usr/bin/env bash
# The waypoint's profile-guided-build training, kept apart from the
# benchmark that measures the result (`bench waypoint`): a config of its
# own (header, regex and weighted routes, rewrites, retries, timeouts,
# header changes, an L7 DENY and ALLOW) and a traffic mix of its own
# (GET, POST, PUT and DELETE with and without bodies, 16 KiB responses,
# denied requests; HTTP/1.1 from wrk, HTTP/2 from h2load, sent upstream
# over HTTP/1.1 and HTTP/2), all on loopback, with Debian's nginx as the
# backend. The waypoint writes its profile when it exits.
#
# Usage: scripts/pgo-train-waypoint.sh WAYPOINT_BIN  (wrk, h2load, nginx
#   and openssl on PATH: scripts/setup.sh installs them)
set -euo pipefail

BIN=$1
SECS=${TRAIN_SECS:-8}
# Loopback ports, checked free below.
H1=27081 H2=27083 WP=27080 HBONE=27008 ADMIN=27000 METRICS=27020 READY=27021
DIR=$(mktemp -d /tmp/pgo-train.XXXXXX)
# nginx's workers (user nobody) serve files from it.
chmod 755 "$DIR"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [[ -f $DIR/nginx.pid ]] && kill "$(cat "$DIR/nginx.pid")" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

for p in $H1 $H2 $WP $HBONE $ADMIN $METRICS $READY; do
  if ss -Hltn "sport = :$p" | grep -q .; then
    echo "pgo-train-waypoint.sh: ERROR: port $p on loopback is in use" >&2
    exit 1
  fi
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=pgo-train-ca -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
mkdir -p "$DIR/www/files" "$DIR/tmp"
head -c 16384 /dev/urandom > "$DIR/www/files/16k.bin"

cat > "$DIR/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $DIR/tmp/body;
  proxy_temp_path $DIR/tmp/proxy;
  fastcgi_temp_path $DIR/tmp/fastcgi;
  uwsgi_temp_path $DIR/tmp/uwsgi;
  scgi_temp_path $DIR/tmp/scgi;
  server {
    listen 127.0.0.1:$H1;
    listen 127.0.0.1:$H2 http2;
    root $DIR/www;
    location /files/ { }
    location / { add_header x-backend nginx; return 200 "trained\n"; }
  }
}
EOF

endpoint() {
  echo "    load_assignment: {endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: \"127.0.0.1\", port_value: $1}}}}]}]}"
}
cat > "$DIR/waypoint.yaml" <<EOF
listeners:
  - name: waypoint
    filter_chains:
      - name: train
        filter_chain_match: {destination_port: $WP}
        http_connection_manager:
          route_config_name: train
          rbac:
            - action: DENY
              policies:
                no-admin:
                  permissions: [{paths: [{prefix: /admin}]}]
            - action: ALLOW
              policies:
                usual-methods:
                  permissions: [{methods: [GET, POST, PUT, DELETE]}]
route_configurations:
  - name: train
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {prefix: /, headers: [{name: x-upstream, string_match: {exact: h2}}]}
            route: {cluster: backend-h2, timeout: 10s}
          - match: {prefix: /api/, headers: [{name: x-version, string_match: {exact: v2}}]}
            route: {cluster: backend, prefix_rewrite: /v2/api/, timeout: 5s}
            request_headers_to_add:
              - header: {key: x-routed, value: v2}
            response_headers_to_remove: [x-backend]
          - match:
              safe_regex: {regex: '/items/[0-9]+'}
            route:
              cluster: backend
              retry_policy: {retry_on: 5xx, num_retries: 2}
          - match: {prefix: /api/}
            route:
              weighted_clusters:
                clusters: [{name: backend, weight: 80}, {name: backend-copy, weight: 20}]
          - match: {prefix: /static/}
            route:
              cluster: backend
              regex_rewrite: {pattern: {regex: '^/static/(.*)$'}, substitution: '/assets/\$1'}
            response_headers_to_add:
              - header: {key: cache-control, value: max-age=60}
          - match: {prefix: /}
            route: {cluster: backend}
clusters:
  - name: backend
    upstream_protocol: HTTP1
$(endpoint $H1)
  - name: backend-copy
    upstream_protocol: HTTP1
$(endpoint $H1)
  - name: backend-h2
    upstream_protocol: HTTP2
$(endpoint $H2)
EOF

cat > "$DIR/mix.lua" <<'EOF'
local reqs = {}
local i = 0
function init(args)
  reqs = {
    wrk.format("GET", "/api/users", {["x-version"] = "v2", ["accept"] = "application/json"}),
    wrk.format("GET", "/items/12345?debug=on", {["user-agent"] = "pgo-train/1"}),
    wrk.format("POST", "/upload", {["content-type"] = "application/octet-stream"}, string.rep("x", 4096)),
    wrk.format("GET", "/files/16k.bin"),
    wrk.format("GET", "/admin/settings"),
    wrk.format("GET", "/static/app.css?v=3", {["cookie"] = "session=abc; theme=dark"}),
    wrk.format("PUT", "/api/items/7", {["content-type"] = "application/json"}, '{"name":"seven"}'),
    wrk.format("GET", "/", {["x-upstream"] = "h2"}),
    wrk.format("DELETE", "/api/items/7"),
    wrk.format("GET", "/"),
  }
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
EOF
printf '%.0s{"q":"train"}' $(seq 64) > "$DIR/post.json"

nginx -c "$DIR/nginx.conf" -p "$DIR"
RUST_LOG=warn "$BIN" --config "$DIR/waypoint.yaml" --ca-cert "$DIR/ca.crt" --ca-key "$DIR/ca.key" \
  --hbone-addr 127.0.0.1:$HBONE --plaintext-addr 127.0.0.1:$WP --admin-addr 127.0.0.1:$ADMIN \
  --metrics-addr 127.0.0.1:$METRICS --readiness-addr 127.0.0.1:$READY --worker-threads 2 \
  > "$DIR/waypoint.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$WP/" && break
  sleep 0.2
done
curl -sf -o /dev/null "http://127.0.0.1:$WP/" || {
  echo "pgo-train-waypoint.sh: ERROR: the waypoint did not answer; its log:" >&2
  cat "$DIR/waypoint.log" >&2
  exit 1
}

URL=http://127.0.0.1:$WP
echo "== HTTP/1.1 mix (wrk, ${SECS}s)"
wrk -t2 -c32 -d"${SECS}s" -s "$DIR/mix.lua" "$URL/" | grep -E "Requests/sec|Non-2xx"
echo "== HTTP/2 to HTTP/1.1 and HTTP/2 upstreams (h2load)"
h2load -c4 -m8 -D "$((SECS / 2))" "$URL/api/list" "$URL/items/9" "$URL/files/16k.bin" "$URL/admin/x" \
  | grep -E "^requests:|^status codes:"
h2load -c4 -m8 -D "$((SECS / 2))" -H "x-upstream: h2" "$URL/" "$URL/files/16k.bin" \
  | grep -E "^requests:|^status codes:"
echo "== gRPC-shaped and bodied HTTP/2 requests (h2load)"
h2load -c2 -m8 -D "$((SECS / 4))" -d "$DIR/post.json" -H "content-type: application/grpc" \
  -H "te: trailers" "$URL/pkg.Service/Method" | grep -E "^requests:|^status codes:"

# Stopped with SIGTERM, the waypoint exits normally and writes its profile.
kill -TERM "${pids[0]}"
wait "${pids[0]}" || true
pids=()
