package atlassidecar

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

func TestBatchSizeIsCappedAtTheSidecarsDefault(t *testing.T) {
	o := EventStreamOptions{BatchSize: 50_000}.withDefaults()
	if o.BatchSize != MaxEventsPerBatch {
		t.Fatalf("BatchSize %d, want it capped at %d", o.BatchSize, MaxEventsPerBatch)
	}
}

func TestEventStreamCutsBatchesAtTheCap(t *testing.T) {
	d := newDaemon(t)
	d.env = []string{"ATLAS_SIDECAR__INGEST__MAX_EVENTS_PER_BATCH=50"}
	d.start()
	s, err := NewEventStream(d.target(), EventStreamOptions{BatchSize: 1000, MaxEventsPerBatch: 50})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	for i := 0; i < 120; i++ {
		s.RecordInference(&pb.Inference{RequestId: fmt.Sprintf("r%d", i), ModelVersion: "v1"})
	}
	flushOrFail(t, s, 30*time.Second)
	if st := s.Stats(); st.Accepted != 120 || st.Rejected != 0 || st.RejectedBatches != 0 {
		t.Fatalf("client stats: %+v", st)
	}
	if got := d.status().GetEvents().GetAccepted(); got != 120 {
		t.Fatalf("daemon accepted %d, want 120", got)
	}
}

// A batch the sidecar refuses whole (here: a client set above the daemon's
// cap) is counted and dropped, not resent forever.
func TestEventStreamDropsABatchRefusedWhole(t *testing.T) {
	d := newDaemon(t)
	d.env = []string{"ATLAS_SIDECAR__INGEST__MAX_EVENTS_PER_BATCH=5"}
	d.start()
	s, err := NewEventStream(d.target(), EventStreamOptions{
		BatchSize: 10, MaxEventsPerBatch: 10, Linger: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	for i := 0; i < 10; i++ {
		s.RecordInference(&pb.Inference{RequestId: fmt.Sprintf("big%d", i), ModelVersion: "v1"})
	}
	flushOrFail(t, s, 15*time.Second)
	st := s.Stats()
	if st.Rejected != 10 || st.RejectedBatches != 1 || st.Accepted != 0 {
		t.Fatalf("after the refused batch: %+v", st)
	}
	if !strings.Contains(st.LastError, "ingest.max_events_per_batch") {
		t.Fatalf("last error %q does not name the key", st.LastError)
	}
	for i := 0; i < 3; i++ {
		s.RecordInference(&pb.Inference{RequestId: fmt.Sprintf("small%d", i), ModelVersion: "v1"})
	}
	flushOrFail(t, s, 15*time.Second)
	if st := s.Stats(); st.Accepted != 3 || st.RejectedBatches != 1 {
		t.Fatalf("after the small batch: %+v", st)
	}
	if got := d.status().GetEvents().GetAccepted(); got != 3 {
		t.Fatalf("daemon accepted %d, want 3", got)
	}
}

func TestEventStreamCountsUnlistedRejections(t *testing.T) {
	d := newDaemon(t)
	d.env = []string{"ATLAS_SIDECAR__INGEST__MAX_REJECTIONS_PER_ACK=2"}
	d.start()
	s, err := NewEventStream(d.target(), EventStreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	for i := 0; i < 5; i++ {
		s.RecordInference(&pb.Inference{RequestId: "", ModelVersion: "v1"}) // request_id is required
	}
	s.RecordInference(&pb.Inference{RequestId: "ok", ModelVersion: "v1"})
	flushOrFail(t, s, 30*time.Second)
	if st := s.Stats(); st.Accepted != 1 || st.Rejected != 5 || st.RejectedBatches != 0 {
		t.Fatalf("client stats: %+v", st)
	}
}
