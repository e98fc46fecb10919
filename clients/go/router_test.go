package atlassidecar

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

type routingVector struct {
	RequestID       string          `json:"request_id"`
	SessionID       string          `json:"session_id"`
	UserID          string          `json:"user_id"`
	Key             string          `json:"key"`
	Bucket          uint32          `json:"bucket"`
	Split           json.RawMessage `json:"split"`
	ExpectedVersion string          `json:"expected_version"`
	Mirror          bool            `json:"mirror"`
}

func loadVectors(t *testing.T) []routingVector {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "testdata", "routing_vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Vectors []routingVector `json:"vectors"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Vectors) < 200 {
		t.Fatalf("expected at least 200 routing vectors, got %d", len(doc.Vectors))
	}
	return doc.Vectors
}

func TestRoutingVectors(t *testing.T) {
	vectors := loadVectors(t)
	for i, v := range vectors {
		split := &pb.SetTrafficSplit{}
		if err := protojson.Unmarshal(v.Split, split); err != nil {
			t.Fatalf("vector %d: split: %v", i, err)
		}
		if got := StickyKey(v.RequestID, v.SessionID, v.UserID); got != v.Key {
			t.Errorf("vector %d: key %q, want %q", i, got, v.Key)
		}
		if got := Bucket(v.Key); got != v.Bucket {
			t.Errorf("vector %d: bucket(%q) = %d, want %d", i, v.Key, got, v.Bucket)
		}
		r := NewRouter("unused")
		if !r.Apply(split) {
			t.Fatalf("vector %d: split refused", i)
		}
		d := r.Route(v.RequestID, v.SessionID, v.UserID)
		if d.Version != v.ExpectedVersion || d.Mirror != v.Mirror || d.Bucket != v.Bucket {
			t.Errorf("vector %d: got %+v, want version %q mirror %v bucket %d",
				i, d, v.ExpectedVersion, v.Mirror, v.Bucket)
		}
		if d.Mirror && d.MirrorVersion != split.GetShadow().GetVersion() {
			t.Errorf("vector %d: mirror version %q", i, d.MirrorVersion)
		}
	}
}

type fakeClock struct{ t time.Time }

func (c *fakeClock) Now() time.Time          { return c.t }
func (c *fakeClock) Advance(d time.Duration) { c.t = c.t.Add(d) }

func canarySplit(rev uint64, lease uint32) *pb.SetTrafficSplit {
	return &pb.SetTrafficSplit{
		Revision: rev,
		Routes: []*pb.Route{
			{Version: "v2", WeightBps: 10000}, // everything to the candidate
		},
		Shadow:        &pb.Shadow{Version: "v3", MirrorBps: 10000},
		LeaseSeconds:  lease,
		StableVersion: "v1",
	}
}

func TestLeaseFallsBackToStable(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	r := NewRouter("v0", WithClock(clock.Now))
	if d := r.Route("req", "", ""); d.Version != "v0" || d.Fallback {
		t.Fatalf("before any split: %+v", d)
	}
	r.Apply(canarySplit(1, 30))
	clock.Advance(time.Hour)
	if d := r.Route("req", "", ""); d.Version != "v2" || !d.Mirror || d.MirrorVersion != "v3" {
		t.Fatalf("while connected the split holds, however long: %+v", d)
	}
	r.SidecarLost()
	clock.Advance(20 * time.Second)
	r.SidecarLost() // a second call keeps the first time
	clock.Advance(10 * time.Second)
	if d := r.Route("req", "", ""); d.Version != "v2" || r.LeaseExpired() {
		t.Fatalf("at the lease's end the split still holds: %+v", d)
	}
	clock.Advance(time.Second)
	d := r.Route("req", "", "")
	if d.Version != "v1" || !d.Fallback || d.Mirror || !r.LeaseExpired() || r.Fallbacks() != 1 {
		t.Fatalf("after the lease: %+v (fallbacks %d)", d, r.Fallbacks())
	}
	r.SidecarConnected()
	if d := r.Route("req", "", ""); d.Version != "v2" || d.Fallback {
		t.Fatalf("after reconnecting: %+v", d)
	}
}

func TestNoLeaseNeverFallsBack(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	r := NewRouter("v0", WithClock(clock.Now))
	r.Apply(canarySplit(1, 0))
	r.SidecarLost()
	clock.Advance(1000 * time.Hour)
	if d := r.Route("req", "", ""); d.Version != "v2" || d.Fallback {
		t.Fatalf("a split without a lease holds: %+v", d)
	}
}

func TestLeaseFallbackWithoutStableVersion(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	r := NewRouter("v0", WithClock(clock.Now))
	r.Apply(&pb.SetTrafficSplit{
		Revision:     1,
		Routes:       []*pb.Route{{Version: "v4", WeightBps: 0}, {Version: "v5", WeightBps: 10000}},
		LeaseSeconds: 5,
	})
	r.SidecarLost()
	clock.Advance(6 * time.Second)
	if d := r.Route("req", "", ""); d.Version != "v4" || !d.Fallback {
		t.Fatalf("fallback is the first route: %+v", d)
	}
}

func TestOlderOrSameRevisionIgnored(t *testing.T) {
	r := NewRouter("v0")
	if !r.Apply(canarySplit(5, 0)) {
		t.Fatal("first split refused")
	}
	for _, rev := range []uint64{4, 5} {
		other := &pb.SetTrafficSplit{Revision: rev, Routes: []*pb.Route{{Version: "old", WeightBps: 10000}}}
		if r.Apply(other) {
			t.Fatalf("revision %d was applied over revision 5", rev)
		}
	}
	if d := r.Route("req", "", ""); d.Version != "v2" || r.Revision() != 5 {
		t.Fatalf("an older split changed routing: %+v rev %d", d, r.Revision())
	}
	if !r.Apply(canarySplit(6, 0)) || r.Revision() != 6 {
		t.Fatal("a newer split was refused")
	}
}

func TestApplyCopiesSplit(t *testing.T) {
	r := NewRouter("v0")
	s := canarySplit(1, 0)
	r.Apply(s)
	s.Routes[0].Version = "mutated"
	if d := r.Route("req", "", ""); d.Version != "v2" {
		t.Fatalf("router shares the caller's split: %+v", d)
	}
}
