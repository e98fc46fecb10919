package atlassidecar

import (
	"crypto/sha256"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

// Buckets is the number of routing buckets: weights are in basis points.
const Buckets = 10000

// StickyKey is the routing key of a request: the session id when present,
// else the user id, else the request id. Requests with the same key always
// land in the same bucket, so a session keeps seeing one model version.
func StickyKey(requestID, sessionID, userID string) string {
	if sessionID != "" {
		return sessionID
	}
	if userID != "" {
		return userID
	}
	return requestID
}

// Bucket is uint64_be(sha256(utf8(key))[0:8]) % 10000, the same in every
// language's client.
func Bucket(key string) uint32 {
	sum := sha256.Sum256([]byte(key))
	return uint32(binary.BigEndian.Uint64(sum[:8]) % Buckets)
}

// RouteBucket applies a split to a bucket: walk the routes in order summing
// weight_bps and take the first whose running sum exceeds the bucket. When the
// weights sum to no more than the bucket, the answer is the split's
// stable_version, or the first route when that is empty, or "" when the split
// has no routes.
func RouteBucket(bucket uint32, split *pb.SetTrafficSplit) string {
	var total uint64
	routes := split.GetRoutes()
	for _, r := range routes {
		total += uint64(r.GetWeightBps())
		if total > uint64(bucket) {
			return r.GetVersion()
		}
	}
	return FallbackVersion(split)
}

// Mirrors reports whether a bucket is mirrored to the split's shadow version.
func Mirrors(bucket uint32, split *pb.SetTrafficSplit) bool {
	s := split.GetShadow()
	return s.GetMirrorBps() > 0 && bucket < s.GetMirrorBps()
}

// Decision is where one request goes.
type Decision struct {
	// Version serves the request and its answer is shown to the user.
	Version string
	// Mirror is true when a copy of the request should also go to
	// MirrorVersion; that answer is never shown (record it with role SHADOW
	// and the same request id, which is how the sidecar pairs the two).
	Mirror        bool
	MirrorVersion string
	// Bucket is the request's routing bucket in [0, 10000).
	Bucket uint32
	// Fallback is true when the lease ran out and the router answers with
	// the split's stable version instead of the split.
	Fallback bool
}

// Router decides which model version serves each request from the traffic
// split the sidecar pushed last (SetTrafficSplit). It is safe for concurrent
// use and costs one SHA-256 and a read lock per request.
//
// Lease: while the sidecar is connected the split holds. After SidecarLost,
// once the split's lease_seconds have passed without SidecarConnected, every
// request goes to the split's stable version and nothing is mirrored, until
// the sidecar is back. A split with lease_seconds 0 never falls back.
type Router struct {
	mu        sync.RWMutex
	split     *pb.SetTrafficSplit
	def       string
	now       func() time.Time
	lostAt    time.Time
	lost      bool
	fallbacks atomic.Uint64
}

// RouterOption configures a Router.
type RouterOption func(*Router)

// WithClock replaces time.Now, for tests of the lease.
func WithClock(now func() time.Time) RouterOption {
	return func(r *Router) { r.now = now }
}

// NewRouter returns a router that sends everything to defaultVersion until
// the first split arrives.
func NewRouter(defaultVersion string, opts ...RouterOption) *Router {
	r := &Router{def: defaultVersion, now: time.Now}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Apply installs a copy of split unless a split of an equal or newer
// (non-zero) revision is installed: splits are idempotent by revision. It
// reports whether the split was installed.
func (r *Router) Apply(split *pb.SetTrafficSplit) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur := r.split; cur != nil && cur.GetRevision() != 0 && split.GetRevision() <= cur.GetRevision() {
		return false
	}
	r.split = proto.Clone(split).(*pb.SetTrafficSplit)
	return true
}

// SidecarConnected stops the lease clock: the split holds again.
func (r *Router) SidecarConnected() {
	r.mu.Lock()
	r.lost = false
	r.mu.Unlock()
}

// SidecarLost starts the lease clock; a second call keeps the first time.
func (r *Router) SidecarLost() {
	r.mu.Lock()
	if !r.lost {
		r.lost, r.lostAt = true, r.now()
	}
	r.mu.Unlock()
}

// LeaseExpired reports whether the sidecar has been gone for longer than
// the installed split's lease.
func (r *Router) LeaseExpired() bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.expiredLocked()
}

func (r *Router) expiredLocked() bool {
	lease := r.split.GetLeaseSeconds()
	return r.split != nil && r.lost && lease > 0 && r.now().Sub(r.lostAt) > time.Duration(lease)*time.Second
}

// Split returns a copy of the installed split (nil: none yet).
func (r *Router) Split() *pb.SetTrafficSplit {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.split == nil {
		return nil
	}
	return proto.Clone(r.split).(*pb.SetTrafficSplit)
}

// Revision is the revision of the installed split (0: none).
func (r *Router) Revision() uint64 {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.split.GetRevision()
}

// Fallbacks counts the requests routed to the stable version because the
// lease ran out.
func (r *Router) Fallbacks() uint64 { return r.fallbacks.Load() }

// Route decides where a request goes; see StickyKey for which id is used.
func (r *Router) Route(requestID, sessionID, userID string) Decision {
	b := Bucket(StickyKey(requestID, sessionID, userID))
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.split == nil {
		return Decision{Version: r.def, Bucket: b}
	}
	if r.lost && r.expiredLocked() {
		r.fallbacks.Add(1)
		return Decision{Version: FallbackVersion(r.split), Bucket: b, Fallback: true}
	}
	d := Decision{Version: RouteBucket(b, r.split), Bucket: b}
	if Mirrors(b, r.split) {
		d.Mirror = true
		d.MirrorVersion = r.split.GetShadow().GetVersion()
	}
	return d
}

// FallbackVersion is the version a split falls back to, when its weights do
// not cover a bucket or its lease ran out: its stable_version, else its first
// route's version.
func FallbackVersion(split *pb.SetTrafficSplit) string {
	if v := split.GetStableVersion(); v != "" {
		return v
	}
	if rs := split.GetRoutes(); len(rs) > 0 {
		return rs[0].GetVersion()
	}
	return ""
}
