#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, with no Docker and no
# network (../shared/k8s/NOTES.md has the facts behind every choice here).
#
#   scripts/cluster/cluster.sh up      install the Debian parts if absent (apt-get),
#                                      build the rest (scripts/cluster/build.sh, cached),
#                                      start etcd, the control plane, containerd, the
#                                      kubelet, kube-proxy and CoreDNS; prints the kubeconfig
#   scripts/cluster/cluster.sh down    stop all of it and remove what it made, then check
#                                      (works after a half-finished up as well)
#   scripts/cluster/cluster.sh check   list what is left of a cluster (exit 1 if anything)
#   scripts/cluster/cluster.sh env     print the exports for the scenarios
#   scripts/cluster/cluster.sh exec CMD...   run CMD inside the cluster's network namespace
#   scripts/cluster/cluster.sh import TARBALL...   import images into the node's containerd
#
# Layout: every component, PostgreSQL, Kafka, the test's viewers and every pod
# live in one network namespace with no default route (traffic cannot leave
# the machine). Its links: lo; one end of a veth pair holding the node's
# address (the host keeps the other end, so kubectl works from outside); the
# CNI bridge of the pods. Services are kube-proxy's iptables rules inside the
# namespace. Pods' cgroups are under one cgroup root of their own, the
# containerd and kubelet state, mounts included, under the state directory.
# The down step stops only processes it started: the ones in that namespace
# (recorded by its inode) and in that cgroup root.
#
# Settings (environment; the defaults keep clear of ../shared/k8s/NOTES.md's
# example ranges, so a cluster made from the notes by hand can coexist):
#   RELAY_CLUSTER_STATE   state directory (/tmp/relay-cluster)
#   RELAY_CLUSTER_NAME    name of the namespace and cgroup root (relay-cluster)
#   RELAY_CLUSTER_NODE    node address; the host's end is this minus one, in a /30 (10.250.7.2)
#   RELAY_CLUSTER_PODS    pod range (10.245.7.0/24)
#   RELAY_CLUSTER_SERVICES service range (10.97.0.0/16); the API at .0.1, DNS at .0.10
#   RELAY_K8S_CACHE       build cache (~/.cache/relay-k8s, see build.sh)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
S="${RELAY_CLUSTER_STATE:-/tmp/relay-cluster}"
NAME="${RELAY_CLUSTER_NAME:-relay-cluster}"
NODE_IP="${RELAY_CLUSTER_NODE:-10.250.7.2}"
POD_CIDR="${RELAY_CLUSTER_PODS:-10.245.7.0/24}"
SVC_CIDR="${RELAY_CLUSTER_SERVICES:-10.97.0.0/16}"
CACHE="${RELAY_K8S_CACHE:-$HOME/.cache/relay-k8s}"
K8S_BIN="$CACHE/k8s-v1.32.13/bin"
DNS_BIN="$CACHE/coredns-v1.15.0/bin"
CLUSTERTEST="$(cd "$SCRIPT_DIR/../../deploy/helm/clustertest" && pwd)"

HOST_IP="${NODE_IP%.*}.$((${NODE_IP##*.} - 1))"
SVC_BASE="${SVC_CIDR%.*/*}"           # 10.97.0
API_IP="$SVC_BASE.1"
DNS_IP="$SVC_BASE.10"
POD_GW="${POD_CIDR%.*}.1"
NS_PATH="/run/netns/$NAME"
HOST_LINK="${NAME:0:8}-h"             # interface names are at most 15 bytes
NODE_LINK="${NAME:0:8}-n"
BRIDGE="${NAME:0:8}-br"
CGROOT="/$NAME"
PAUSE_IMAGE="relay.local/pause:1"
COREDNS_IMAGE="relay.local/coredns:1"
CONTAINERD_SOCK="$S/containerd/containerd.sock"
KUBECONFIG_FILE="$S/pki/admin.kubeconfig"

log() { printf '%s cluster: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 1; }

in_ns() { nsenter --net="$NS_PATH" -- "$@"; }
kc() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

ensure_packages() {
	local need=() p
	command -v etcd >/dev/null || need+=(etcd-server)
	command -v containerd >/dev/null || need+=(containerd)
	command -v runc >/dev/null || need+=(runc)
	[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
	command -v iptables >/dev/null || need+=(iptables)
	command -v conntrack >/dev/null || need+=(conntrack)
	command -v socat >/dev/null || need+=(socat)
	command -v openssl >/dev/null || need+=(openssl)
	[[ ${#need[@]} -eq 0 ]] && return 0
	[[ "$(id -u)" = 0 ]] || die "need ${need[*]} and not root to apt-get install them"
	log "installing ${need[*]} with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	for p in 1 2; do
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2 && return 0
		sleep 5
	done
	die "apt-get install ${need[*]} failed"
}

# ---- processes -------------------------------------------------------------

# start NAME CMD...: runs CMD in the namespace, in a session of its own, with
# its output in $S/logs/NAME.log, and records its PID.
start() {
	local name=$1
	shift
	setsid nsenter --net="$NS_PATH" -- "$@" </dev/null >>"$S/logs/$name.log" 2>&1 &
	echo $! >"$S/pids/$name"
}

alive() { [[ -f "$S/pids/$1" ]] && kill -0 "$(cat "$S/pids/$1")" 2>/dev/null; }

wait_for() { # wait_for SECONDS WHAT CMD...
	local limit=$1 what=$2 t0=$SECONDS
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS - t0 < limit)) || die "$what not up within ${limit}s (logs: $S/logs)"
		sleep 0.5
	done
}

# ---- certificates and configs ----------------------------------------------

pki() {
	local d="$S/pki"
	mkdir -p "$d"
	cd "$d"
	openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=relay-cluster-ca" 2>/dev/null
	cert() { # cert NAME SUBJECT [SAN]
		openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
		if [[ -n "${3:-}" ]]; then
			printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" >"$1.ext"
		else
			printf 'extendedKeyUsage=clientAuth\n' >"$1.ext"
		fi
		openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
	}
	cert apiserver "/CN=kube-apiserver" "IP:$NODE_IP,IP:$API_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
	# One client identity for every component: the cluster lives for one test.
	cert admin "/O=system:masters/CN=relay-cluster-admin"
	openssl genrsa -out sa.key 2048 2>/dev/null
	openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
	"$K8S_BIN/kubectl" config set-cluster relay --server="https://$NODE_IP:6443" --certificate-authority="$d/ca.crt" --embed-certs --kubeconfig="$KUBECONFIG_FILE" >/dev/null
	"$K8S_BIN/kubectl" config set-credentials admin --client-certificate="$d/admin.crt" --client-key="$d/admin.key" --embed-certs --kubeconfig="$KUBECONFIG_FILE" >/dev/null
	"$K8S_BIN/kubectl" config set-context relay --cluster=relay --user=admin --kubeconfig="$KUBECONFIG_FILE" >/dev/null
	"$K8S_BIN/kubectl" config use-context relay --kubeconfig="$KUBECONFIG_FILE" >/dev/null
	cd - >/dev/null
}

configs() {
	mkdir -p "$S/containerd" "$S/cni/net.d" "$S/kubelet"
	cat >"$S/containerd/config.toml" <<EOF
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$S/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The VM withholds CAP_SYS_RESOURCE: no process may lower oom_score_adj.
  restrict_oom_score_adj = true
  # Pod network namespaces under the state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$S/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$S/cni/net.d"
EOF
	cat >"$S/cni/net.d/10-relay.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$NAME",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$S/cni/ipam"}
  }]
}
EOF
	echo "nameserver $DNS_IP" >"$S/resolv.conf"
	cat >"$S/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
cgroupRoot: $CGROOT
failCgroupV1: false
failSwapOn: false
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $S/pki/ca.crt}
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: $S/resolv.conf
# The disk is shared with other work: no eviction or image GC on its account.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
	cat >"$S/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $KUBECONFIG_FILE}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: relay-node
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the machine's global conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
# Every Service connection is masqueraded, so a pod reaching a pod behind a
# Service on the same bridge gets its answer through the same conntrack entry.
iptables: {masqueradeAll: true}
EOF
}

# ---- up ----------------------------------------------------------------------

network() {
	ip netns add "$NAME"
	stat -L -c %i "$NS_PATH" >"$S/netns.inode"
	ip link add "$HOST_LINK" type veth peer name "$NODE_LINK"
	ip link set "$NODE_LINK" netns "$NAME"
	ip addr add "$HOST_IP/30" dev "$HOST_LINK"
	ip link set "$HOST_LINK" up
	in_ns ip link set lo up
	in_ns ip addr add "$NODE_IP/30" dev "$NODE_LINK"
	in_ns ip link set "$NODE_LINK" up
	# No default route: nothing leaves. The service range is routed towards
	# the host only so that locally made packets reach kube-proxy's DNAT.
	in_ns ip route add "$SVC_CIDR" via "$HOST_IP"
	# Pods reach Services (DNAT to another pod on the bridge): forwarding,
	# inside the namespace only.
	in_ns sysctl -qw net.ipv4.ip_forward=1
	in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
	ip route add "$POD_CIDR" via "$NODE_IP"
	ip route add "$SVC_CIDR" via "$NODE_IP"
}

cgroups() {
	local c
	for c in /sys/fs/cgroup/*/; do
		[[ -f "$c/cgroup.procs" ]] || continue
		mkdir -p "$c$NAME"
		if [[ -f "$c/cpuset.cpus" ]]; then
			cat "$c/cpuset.cpus" >"$c$NAME/cpuset.cpus"
			cat "$c/cpuset.mems" >"$c$NAME/cpuset.mems"
		fi
	done
}

coredns() {
	mkdir -p "$S/images"
	make_image "$DNS_BIN/coredns" "$COREDNS_IMAGE" "$S/images/coredns.tar"
	import_images "$S/images/coredns.tar"
	kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: relay-cluster:coredns}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: relay-cluster:coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: relay-cluster:coredns}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        volumeMounts: [{name: config, mountPath: /etc/coredns}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
EOF
}

make_image() { # make_image BINARY REF TARBALL
	go -C "$CLUSTERTEST" run ./cmd/image -binary "$1" -ref "$2" -out "$3"
}

import_images() {
	local t
	for t in "$@"; do
		in_ns ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --no-unpack=false "$t" >/dev/null
	done
}

up() {
	[[ -e "$NS_PATH" ]] && die "a cluster named $NAME exists already (scripts/cluster/cluster.sh down first)"
	ensure_packages
	bash "$SCRIPT_DIR/build.sh" all
	local t0=$SECONDS
	rm -rf "$S"
	mkdir -p "$S/logs" "$S/pids" "$S/etcd" "$S/images"
	chmod 0755 "$S"
	# containerd 1.6 keeps its shims' sockets in /run/containerd/s whatever
	# its state directory; check compares with this list.
	ls /run/containerd/s 2>/dev/null | sort >"$S.shims.before" || true
	network
	cgroups
	pki
	configs
	log "network, cgroups, certificates ready"

	start etcd etcd --name relay --data-dir "$S/etcd" \
		--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster relay=http://127.0.0.1:2380
	start containerd containerd --config "$S/containerd/config.toml"
	start kube-apiserver "$K8S_BIN/kube-apiserver" --advertise-address="$NODE_IP" --secure-port=6443 \
		--etcd-servers=http://127.0.0.1:2379 --service-cluster-ip-range="$SVC_CIDR" \
		--client-ca-file="$S/pki/ca.crt" --tls-cert-file="$S/pki/apiserver.crt" --tls-private-key-file="$S/pki/apiserver.key" \
		--kubelet-client-certificate="$S/pki/admin.crt" --kubelet-client-key="$S/pki/admin.key" \
		--kubelet-preferred-address-types=InternalIP \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$S/pki/sa.pub" --service-account-signing-key-file="$S/pki/sa.key" \
		--authorization-mode=Node,RBAC --allow-privileged=true
	wait_for 120 kube-apiserver kc get --raw /readyz
	log "kube-apiserver ready ($((SECONDS - t0)) s)"
	start kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG_FILE" \
		--authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE" \
		--leader-elect=false --bind-address=127.0.0.1 \
		--service-account-private-key-file="$S/pki/sa.key" --root-ca-file="$S/pki/ca.crt" --cluster-name=relay
	start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" \
		--authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE" \
		--leader-elect=false --bind-address=127.0.0.1
	wait_for 60 containerd in_ns ctr --address "$CONTAINERD_SOCK" version
	mkdir -p "$S/images"
	CGO_ENABLED=0 go -C "$CLUSTERTEST" build -trimpath -ldflags=-s -o "$S/images/pause" ./cmd/pause
	make_image "$S/images/pause" "$PAUSE_IMAGE" "$S/images/pause.tar"
	import_images "$S/images/pause.tar"
	start kubelet "$K8S_BIN/kubelet" --config="$S/kubelet/config.yaml" --kubeconfig="$KUBECONFIG_FILE" \
		--hostname-override=relay-node --node-ip="$NODE_IP" --root-dir="$S/kubelet" --cert-dir="$S/kubelet/pki" \
		--pod-infra-container-image="$PAUSE_IMAGE"
	start kube-proxy "$K8S_BIN/kube-proxy" --config="$S/kube-proxy.yaml"
	wait_for 90 "node Ready" kc wait --for=condition=Ready node/relay-node --timeout=2s
	# The default ServiceAccount must exist before pods can be made.
	wait_for 60 "default ServiceAccount" kc -n default get serviceaccount default
	coredns
	wait_for 120 CoreDNS kc -n kube-system rollout status deploy/coredns --timeout=2s
	log "cluster up in $((SECONDS - t0)) s (kubeconfig $KUBECONFIG_FILE)"
	echo "$KUBECONFIG_FILE"
}

# ---- down ------------------------------------------------------------------

ns_inode() { cat "$S/netns.inode" 2>/dev/null || true; }

# PIDs of every process in our network namespace or our cgroup root: the
# components (and what they started: shims, PostgreSQL, Kafka) and the pods.
our_pids() {
	local ino p
	ino="$(ns_inode)"
	if [[ -n "$ino" ]]; then
		for p in /proc/[0-9]*; do
			[[ "$(readlink "$p/ns/net" 2>/dev/null)" == "net:[$ino]" ]] && echo "${p#/proc/}"
		done
	fi
	if [[ -d /sys/fs/cgroup/pids$CGROOT ]]; then
		find "/sys/fs/cgroup/pids$CGROOT" -name cgroup.procs -exec cat {} + 2>/dev/null
	fi
	for p in "$S"/pids/*; do
		[[ -f "$p" ]] && kill -0 "$(cat "$p")" 2>/dev/null && cat "$p"
	done
	true
}

stop_pid() { # stop_pid PID SECONDS: TERM, wait, KILL
	local pid=$1 t0=$SECONDS
	kill -TERM "$pid" 2>/dev/null || return 0
	while kill -0 "$pid" 2>/dev/null; do
		if ((SECONDS - t0 >= $2)); then
			kill -KILL "$pid" 2>/dev/null || true
			break
		fi
		sleep 0.2
	done
}

down() {
	local t0=$SECONDS name pid rc=0
	# Kept beside the state directory, which goes: check still finds the
	# processes of a namespace already deleted by its inode.
	cp "$S/netns.inode" "$S.netns.inode" 2>/dev/null || true
	# The control loops first, so nothing restarts what goes next.
	for name in kubelet kube-proxy kube-controller-manager kube-scheduler; do
		[[ -f "$S/pids/$name" ]] && stop_pid "$(cat "$S/pids/$name")" 10
	done
	# The containers, through containerd while it runs: its shims then exit
	# and remove their sockets themselves.
	if alive containerd; then
		local ctr=(in_ns ctr --address "$CONTAINERD_SOCK" -n k8s.io) id
		for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
			"${ctr[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
		done
		for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
			for _ in 1 2 3 4 5 6 7 8 9 10; do
				"${ctr[@]}" tasks delete "$id" >/dev/null 2>&1 && break
				sleep 0.3
			done
		done
	fi
	# PostgreSQL and Kafka (scripts/pg.sh and kafka.sh, run in the namespace).
	if [[ -e "$NS_PATH" && -d "$S/services" ]]; then
		RELAY_TEST_STATE="$S/services" in_ns bash "$SCRIPT_DIR/../kafka.sh" stop >/dev/null 2>&1 || true
		RELAY_TEST_STATE="$S/services" in_ns bash "$SCRIPT_DIR/../pg.sh" stop >/dev/null 2>&1 || true
	fi
	for name in kube-apiserver containerd etcd; do
		[[ -f "$S/pids/$name" ]] && stop_pid "$(cat "$S/pids/$name")" 10
	done
	# Whatever is left of ours (pods' processes, shims): by PID.
	for _ in 1 2 3; do
		for pid in $(our_pids | sort -u); do
			[[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
			stop_pid "$pid" 3
		done
	done
	# Mounts under the state directory (overlay rootfs, shm, pods' network
	# namespaces, kubelet volumes), deepest first.
	local m
	for _ in 1 2 3; do
		while read -r m; do
			umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
		done < <(awk -v s="$S/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
	done
	# Cgroups, deepest first.
	local c
	for c in /sys/fs/cgroup/*"$CGROOT"; do
		[[ -d "$c" ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	ip route del "$POD_CIDR" via "$NODE_IP" 2>/dev/null || true
	ip route del "$SVC_CIDR" via "$NODE_IP" 2>/dev/null || true
	ip link del "$HOST_LINK" 2>/dev/null || true
	[[ -e "$NS_PATH" ]] && ip netns del "$NAME"
	# Keep the logs of the run; drop the rest (images, etcd, containerd).
	if [[ -d "$S" ]]; then
		rm -rf "$S.logs" && mkdir -p "$S.logs"
		cp -r "$S/logs/." "$S.logs/" 2>/dev/null || true
		rm -rf "$S"
	fi
	log "down in $((SECONDS - t0)) s (logs kept in $S.logs)"
	check || rc=1
	rm -f "$S.netns.inode" "$S.shims.before"
	return $rc
}

# check: what is left; exit 1 when anything is.
check() {
	local left=() ino p c
	ino="$(cat "$S.netns.inode" 2>/dev/null || cat "$S/netns.inode" 2>/dev/null || true)"
	[[ -e "$NS_PATH" ]] && left+=("network namespace $NS_PATH")
	ip netns list 2>/dev/null | grep -qw "$NAME" && left+=("network namespace $NAME (ip netns list)")
	if [[ -n "$ino" ]]; then
		for p in /proc/[0-9]*; do
			[[ "$(readlink "$p/ns/net" 2>/dev/null)" == "net:[$ino]" ]] && left+=("process ${p#/proc/} in the namespace: $(tr '\0' ' ' <"$p/cmdline" | cut -c1-80)")
		done
	fi
	for c in /sys/fs/cgroup/*"$CGROOT"; do
		[[ -d "$c" ]] && left+=("cgroup $c")
	done
	grep -q " $S/" /proc/self/mountinfo && left+=("mounts: $(awk -v s="$S/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo | head -3 | tr '\n' ' ')")
	ip route | grep -q -E "^($POD_CIDR|$SVC_CIDR) " && left+=("routes: $(ip route | grep -E "^($POD_CIDR|$SVC_CIDR) " | tr '\n' ';')")
	ip link show "$HOST_LINK" >/dev/null 2>&1 && left+=("link $HOST_LINK")
	[[ -d "$S" ]] && left+=("state directory $S")
	if [[ -f "$S.shims.before" ]]; then
		local new
		new="$(ls /run/containerd/s 2>/dev/null | sort | comm -13 "$S.shims.before" - | tr '\n' ' ')"
		[[ -n "$new" ]] && left+=("shim sockets in /run/containerd/s: $new")
	fi
	for p in /proc/[0-9]*; do
		{ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "$S/" && left+=("process ${p#/proc/} naming $S: $(tr '\0' ' ' <"$p/cmdline" | cut -c1-80)")
	done
	if [[ ${#left[@]} -eq 0 ]]; then
		echo "leftovers check: nothing left (processes in the namespace or naming $S, mounts under $S, cgroups $CGROOT, netns $NAME, routes $POD_CIDR $SVC_CIDR, link $HOST_LINK, state $S, shim sockets)"
		return 0
	fi
	echo "leftovers check: FAILED"
	printf '  %s\n' "${left[@]}"
	return 1
}

print_env() {
	echo "export KUBECONFIG=$KUBECONFIG_FILE"
	echo "export RELAY_CLUSTER_NETNS=$NS_PATH"
	echo "export RELAY_CLUSTER_NODE=$NODE_IP"
	echo "export RELAY_CLUSTER_K8S_BIN=$K8S_BIN"
}

case "${1:-}" in
up)
	# A failed start leaves nothing behind.
	trap 'rc=$?; if ((rc != 0)); then log "up failed, tearing down"; down || true; fi' EXIT
	up
	trap - EXIT
	;;
down) down ;;
check) check ;;
env) print_env ;;
exec)
	shift
	in_ns "$@"
	;;
import)
	shift
	import_images "$@"
	;;
*)
	echo "usage: $0 up|down|check|env|exec CMD...|import TARBALL..." >&2
	exit 2
	;;
esac
