package atlassidecar

import (
	"context"
	"testing"
	"time"

	"github.com/atlas-sidecar/atlas-sidecar/clients/go/internal/loadgen"
)

// The load generator against the real daemon: every event it sends is
// acked and counted by the sidecar, in batches and one per message.
func TestLoadgenAgainstRealDaemon(t *testing.T) {
	d := newDaemon(t)
	d.start()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	total := 0
	for _, batch := range []int{50, 1} {
		res, err := loadgen.Run(ctx, loadgen.Config{Target: d.target(), Events: 300, Batch: batch})
		if err != nil {
			t.Fatalf("batch %d: %v", batch, err)
		}
		if res.Accepted != 300 || res.Duplicates != 0 || res.Rejected != 0 {
			t.Fatalf("batch %d: acked %+v, want 300 accepted", batch, res)
		}
		if want := (300 + batch - 1) / batch; res.Messages != want {
			t.Fatalf("batch %d: %d messages, want %d", batch, res.Messages, want)
		}
		if res.AckP99 < res.AckP50 || res.AckP50 <= 0 {
			t.Fatalf("batch %d: latencies p50 %s p99 %s", batch, res.AckP50, res.AckP99)
		}
		total += 300
	}
	if got := d.status().GetEvents().GetAccepted(); got != uint64(total) {
		t.Fatalf("the sidecar stored %d events, want %d", got, total)
	}
}

func TestLoadgenRejectsEmptyRun(t *testing.T) {
	if _, err := loadgen.Batches(loadgen.Config{Events: 0, Batch: 10}); err == nil {
		t.Fatal("no error for events=0")
	}
}
