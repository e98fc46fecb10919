package atlassidecar

import (
	"crypto/sha256"
	"encoding/binary"
	"sync"
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
	if v := split.GetStableVersion(); v != "" {
		return v
	}
	if len(routes) > 0 {
		return routes[0].GetVersion()
	}
	return ""
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
	// MirrorVersion; that answer is never shown (record it with role SHADOW).
	Mirror        bool
	MirrorVersion string
	// Bucket is the request's routing bucket in [0, 10000).
	Bucket uint32
	// Fallback is true when the lease ran out and the router answers with
	// the stable version instead of the split.
	Fallback bool
}

// Router decides which model version serves each request from the traffic
// split the sidecar pushed last (SetTrafficSplit). It is safe for concurrent
// use and costs one SHA-256 and a read lock per request.
//
// A split with lease_seconds > 0 holds only while the sidecar is heard from:
// every Apply and Renew extends the lease; once it has run out the router
// sends all traffic to the stable version and mirrors nothing, until the
// sidecar is back.
type Router struct {
	mu        sync.RWMutex
	split     *pb.SetTrafficSplit
	heard     time.Time
	fallback  string
	now       func() time.Time
	haveSplit bool
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
	r := &Router{fallback: defaultVersion, now: time.Now}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Apply installs a split and renews the lease. A split whose revision is
// older than the one installed is ignored (Apply returns false); the same
// revision again only renews the lease. The split is copied.
func (r *Router) Apply(split *pb.SetTrafficSplit) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.haveSplit && split.GetRevision() < r.split.GetRevision() {
		return false
	}
	r.split = proto.Clone(split).(*pb.SetTrafficSplit)
	r.haveSplit = true
	r.heard = r.now()
	if v := stableOf(r.split); v != "" {
		r.fallback = v
	}
	return true
}

// Renew records that the sidecar was heard from (a directive, or the control
// stream being up), which extends the lease of the current split.
func (r *Router) Renew() {
	r.mu.Lock()
	r.heard = r.now()
	r.mu.Unlock()
}

// Revision is the revision of the installed split (0: none).
func (r *Router) Revision() uint64 {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.split.GetRevision()
}

// StableVersion is the version served when the lease runs out.
func (r *Router) StableVersion() string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.fallback
}

// Route decides where a request goes; see StickyKey for which id is used.
func (r *Router) Route(requestID, sessionID, userID string) Decision {
	b := Bucket(StickyKey(requestID, sessionID, userID))
	r.mu.RLock()
	defer r.mu.RUnlock()
	if !r.haveSplit {
		return Decision{Version: r.fallback, Bucket: b}
	}
	if lease := r.split.GetLeaseSeconds(); lease > 0 && r.now().Sub(r.heard) > time.Duration(lease)*time.Second {
		return Decision{Version: r.fallback, Bucket: b, Fallback: true}
	}
	d := Decision{Version: RouteBucket(b, r.split), Bucket: b}
	if Mirrors(b, r.split) {
		d.Mirror = true
		d.MirrorVersion = r.split.GetShadow().GetVersion()
	}
	return d
}

// stableOf is the version a split falls back to: its stable_version, else
// its first route with weight, else its first route.
func stableOf(split *pb.SetTrafficSplit) string {
	if v := split.GetStableVersion(); v != "" {
		return v
	}
	for _, r := range split.GetRoutes() {
		if r.GetWeightBps() > 0 {
			return r.GetVersion()
		}
	}
	if rs := split.GetRoutes(); len(rs) > 0 {
		return rs[0].GetVersion()
	}
	return ""
}
