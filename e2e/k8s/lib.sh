# Helpers shared by e2e/k8s/apiserver and e2e/k8s/cluster (sourced, not run).
# They expect DIR (absolute, the instance's directory) to be set.
# shellcheck shell=bash

# Is PID still a process we started? Every process the scripts start names a file
# under DIR on its command line, so a reused PID is not mistaken for ours.
ours() { [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -- "$DIR/"; }

# Stops one of our processes: TERM, up to 10 s for it to exit, then KILL.
stop_pid() {
  ours "$1" || return 0
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 100); do ours "$1" || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  for _ in $(seq 50); do ours "$1" || return 0; sleep 0.1; done
}

# Stops the processes listed as "name pid" lines in FILE, last started first.
stop_recorded() {
  [[ -f $1 ]] || return 0
  local pid pids=()
  while read -r _ pid; do pids=("$pid" "${pids[@]}"); done < "$1"
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  rm -f "$1"
}

# N ports nobody listens on at IP (default loopback), picked below Linux's ephemeral
# range (32768+), where no port-0 listener or outgoing connection can take one before
# our servers bind it; distinct, and checked free.
free_ports() {
  python3 -c 'import random, socket, sys
picked = []
while len(picked) < int(sys.argv[1]):
    port = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind((sys.argv[2], port))
    except OSError:
        continue
    finally:
        s.close()
    if port not in picked:
        picked.append(port)
print(*picked)' "$1" "${2:-127.0.0.1}"
}

# Polls CMD... every 0.2 s until it succeeds; fails (showing LOG's tail) when the
# process PID has exited or TIMEOUT seconds have passed.
#   wait_until NAME PID LOG TIMEOUT CMD...
wait_until() {
  local name=$1 pid=$2 log=$3 timeout=$4 t0=$SECONDS
  shift 4
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null || (( SECONDS - t0 > timeout )); then
      echo "$name exited or not ready after $((SECONDS - t0)) s; last log lines of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    sleep 0.2   # poll interval, not a synchronisation
  done
}

# Certificates under DIR/pki, all signed by one CA. EC keys, as they are made
# instantly; Go and rustls both take them.
pki_newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/pki/$1.key" 2>/dev/null; }
pki_ca() {
  mkdir -p "$DIR/pki"
  pki_newkey ca
  openssl req -x509 -new -key "$DIR/pki/ca.key" -subj /CN=petrel-e2e-ca -days 365 -out "$DIR/pki/ca.crt"
}
# pki_sign NAME SUBJECT server|client [SANS]
pki_sign() (
  cd "$DIR/pki" || exit
  pki_newkey "$1"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=${3}Auth"
    [[ -z ${4:-} ]] || echo "subjectAltName=$4"
  } > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days 365 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
)
# Service-account tokens: kube-apiserver refuses to start without a key pair.
pki_sa() {
  pki_newkey sa
  openssl pkey -in "$DIR/pki/sa.key" -pubout -out "$DIR/pki/sa.pub"
}

# write_kubeconfig FILE SERVER CERT: credentials DIR/pki/CERT.{crt,key}, CA DIR/pki/ca.crt.
write_kubeconfig() {
  local b="base64 -w0"
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: petrel-e2e
  cluster:
    server: $2
    certificate-authority-data: $($b "$DIR/pki/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $($b "$DIR/pki/$3.crt")
    client-key-data: $($b "$DIR/pki/$3.key")
contexts:
- name: petrel-e2e
  context: {cluster: petrel-e2e, user: $3, namespace: default}
current-context: petrel-e2e
KC
}

# https GET with the admin certificate: api_ok URL
api_ok() {
  curl -sf -o /dev/null --max-time 2 --cacert "$DIR/pki/ca.crt" \
    --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" "$1"
}

# Seconds since the nanosecond timestamp NS0, as "S.mmm".
elapsed() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }
