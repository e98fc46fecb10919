package atlassidecar

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

func flushOrFail(t *testing.T, s *EventStream, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush: %v (stats %+v)", err, s.Stats())
	}
}

// Auth is on, as in production: the stream sends an ingest token, and
// d.status() asks with a read token.
func TestEventStreamDeliversToRealDaemon(t *testing.T) {
	d := newDaemon(t)
	d.enableAuth(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	d.start()
	s, err := NewEventStream(d.target(), EventStreamOptions{BatchSize: 50, Token: testIngestToken})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())

	const workers, perWorker = 4, 250
	ids := make([][]string, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < perWorker; i++ {
				req := fmt.Sprintf("req-%d-%d", w, i)
				if i%2 == 0 {
					ids[w] = append(ids[w], s.RecordInference(&pb.Inference{
						RequestId: req, ModelVersion: "v1", Prompt: "hi", Response: "hello",
						LatencyMs: 12.5, SessionId: fmt.Sprintf("sess-%d", w),
					}))
				} else {
					rating := float32(0) // a rating of 0 is a rating
					ids[w] = append(ids[w], s.RecordFeedback(&pb.Feedback{
						RequestId: fmt.Sprintf("req-%d-%d", w, i-1), Signal: pb.Signal_COPY, Rating: &rating,
					}))
				}
			}
		}(w)
	}
	wg.Wait()
	flushOrFail(t, s, 30*time.Second)

	for w := range ids {
		for i := 1; i < len(ids[w]); i++ {
			if !isUUIDv7(ids[w][i]) || ids[w][i] <= ids[w][i-1] {
				t.Fatalf("event ids are not increasing UUIDv7s: %q then %q", ids[w][i-1], ids[w][i])
			}
		}
	}
	st := s.Stats()
	total := uint64(workers * perWorker)
	if st.Recorded != total || st.Accepted != total || st.Dropped != 0 || st.Rejected != 0 {
		t.Fatalf("client stats: %+v", st)
	}
	if got := d.status().GetEvents(); got.GetAccepted() != total || got.GetDuplicates() != 0 || got.GetRejected() != 0 {
		t.Fatalf("daemon counts %+v, want %d accepted", got, total)
	}

	// An event the sidecar refuses is counted, and the rest of its batch is stored.
	s.RecordInference(&pb.Inference{RequestId: "", ModelVersion: "v1"}) // request_id is required
	s.RecordInference(&pb.Inference{RequestId: "ok", ModelVersion: "v1"})
	flushOrFail(t, s, 30*time.Second)
	if st := s.Stats(); st.Rejected != 1 || st.Accepted != total+1 {
		t.Fatalf("after a bad event: %+v", st)
	}
	if got := d.status().GetEvents(); got.GetAccepted() != total+1 || got.GetRejected() != 1 {
		t.Fatalf("daemon counts after a bad event: %+v", got)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// The daemon is killed (SIGKILL) while events stream and restarted on the
// same port and data: the stream resends what was not acked, and the sidecar
// ends up with every event exactly once.
func TestEventStreamResendsAfterDaemonCrash(t *testing.T) {
	d := newDaemon(t)
	d.enableAuth(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	d.start()
	s, err := NewEventStream(d.target(), EventStreamOptions{
		Token: testIngestToken, BatchSize: 20, BackoffInitial: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())

	stop := make(chan struct{})
	produced := make(chan int)
	go func() {
		n := 0
		defer func() { produced <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			for i := 0; i < 20; i++ {
				s.RecordInference(&pb.Inference{RequestId: fmt.Sprintf("r%d", n), ModelVersion: "v1", Response: "x"})
				n++
			}
			time.Sleep(time.Millisecond)
		}
	}()

	waitAcked := func(min uint64) {
		deadline := time.Now().Add(30 * time.Second)
		for s.Stats().AckedEvents < min {
			if time.Now().After(deadline) {
				t.Fatalf("no progress: %+v", s.Stats())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for round := 1; round <= 2; round++ {
		waitAcked(s.Stats().AckedEvents + 200)
		d.kill()
		time.Sleep(50 * time.Millisecond) // events keep coming while it is down
		d.start()
	}
	waitAcked(s.Stats().AckedEvents + 200)
	close(stop)
	n := <-produced
	flushOrFail(t, s, 60*time.Second)

	st := s.Stats()
	if st.Dropped != 0 || st.Reconnects == 0 {
		t.Fatalf("client stats: %+v", st)
	}
	if st.AckedEvents != uint64(n) {
		t.Fatalf("acked %d of %d recorded: %+v", st.AckedEvents, n, st)
	}
	if got := d.status().GetEvents(); got.GetAccepted() != uint64(n) {
		t.Fatalf("daemon stored %d events, want each of %d exactly once (%+v)", got.GetAccepted(), n, got)
	}
}

// Without a sidecar, recording neither blocks nor grows without bound: the
// queue fills and the drop policy counts what is lost.
func TestEventStreamBoundedWhenSidecarIsDown(t *testing.T) {
	for _, policy := range []DropPolicy{DropNewest, DropOldest} {
		s, err := NewEventStream(fmt.Sprintf("127.0.0.1:%d", freePort(t)), EventStreamOptions{
			MaxQueue: 100, BatchSize: 10, MaxInflightBatches: 2, DropPolicy: policy,
		})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 1000; i++ {
			s.RecordFeedback(&pb.Feedback{RequestId: "r", Signal: pb.Signal_ENGAGE})
		}
		// At most the queue, the batches in flight and one partial batch are held.
		const held = 100 + (2+1)*10
		st := s.Stats()
		if st.Recorded != 1000 || st.Dropped < 1000-held {
			t.Fatalf("policy %d: %+v", policy, st)
		}
		if p := s.Pending(); p > held || uint64(p)+st.Dropped != 1000 {
			t.Fatalf("policy %d: pending %d, stats %+v", policy, p, st)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		if err := s.Close(ctx); err == nil {
			t.Fatalf("policy %d: close reported success with nothing delivered", policy)
		}
		cancel()
		if st := s.Stats(); st.Dropped != 1000 {
			t.Fatalf("policy %d: undelivered events not counted at close: %+v", policy, st)
		}
		s.RecordFeedback(&pb.Feedback{RequestId: "late"})
		if st := s.Stats(); st.Dropped != 1001 || s.Pending() != 0 {
			t.Fatalf("policy %d: an event recorded after close: %+v, pending %d", policy, st, s.Pending())
		}
		if err := s.Flush(context.Background()); err != nil {
			t.Fatalf("policy %d: flush after close: %v", policy, err)
		}
	}
}
