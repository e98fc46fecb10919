// Package loadgen streams synthetic events at an atlas-sidecar on one
// IngestService.StreamEvents call and measures what comes back: the rate of
// acked events and messages and each batch's ack latency.
//
// It exists so that the sidecar's ingest can be measured with a client that
// costs little CPU: a Python client on the same small machine takes about as
// much CPU per message as the server does, and would measure itself.
package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

// Config says what to send.
type Config struct {
	// Target is the sidecar's gRPC address ("127.0.0.1:50051", "unix:/path").
	Target string
	// Events is how many events to send in all.
	Events int
	// Batch is the number of events per EventBatch message (1 = one event per message).
	Batch int
	// Rate paces sending at this many events per second; 0 sends as fast as
	// flow control allows.
	Rate float64
	// Prefix starts every request id, so runs can be told apart in the store.
	Prefix string
}

// Result is what one run measured.
type Result struct {
	Events     int           `json:"events"`
	Messages   int           `json:"messages"`
	Accepted   int           `json:"accepted"`
	Duplicates int           `json:"duplicates"`
	Rejected   int           `json:"rejected"`
	Seconds    float64       `json:"seconds"`
	EventsPerS float64       `json:"events_per_second"`
	MsgsPerS   float64       `json:"messages_per_second"`
	AckP50     time.Duration `json:"ack_p50_ns"`
	AckP99     time.Duration `json:"ack_p99_ns"`
}

// Batches builds the messages of a run: two inferences for every feedback,
// each event about 340 bytes, time-ordered ids.
func Batches(cfg Config) ([]*pb.EventBatch, error) {
	if cfg.Events <= 0 || cfg.Batch <= 0 {
		return nil, fmt.Errorf("loadgen: events (%d) and batch (%d) must be > 0", cfg.Events, cfg.Batch)
	}
	now := timestamppb.Now()
	out := make([]*pb.EventBatch, 0, (cfg.Events+cfg.Batch-1)/cfg.Batch)
	for start := 0; start < cfg.Events; start += cfg.Batch {
		n := min(cfg.Batch, cfg.Events-start)
		evs := make([]*pb.Event, n)
		for i := range evs {
			k := start + i
			id, err := uuid.NewV7()
			if err != nil {
				return nil, err
			}
			ev := &pb.Event{EventId: id.String(), Time: now}
			if k%3 == 2 {
				ev.Payload = &pb.Event_Feedback{Feedback: &pb.Feedback{
					RequestId:  fmt.Sprintf("%sreq-%d", cfg.Prefix, k-1),
					Signal:     pb.Signal_COPY,
					Rating:     ptr(float32(0.8)),
					UserId:     "user-1234",
					Attributes: map[string]string{"task_id": "support"},
				}}
			} else {
				ev.Payload = &pb.Event_Inference{Inference: &pb.Inference{
					RequestId:    fmt.Sprintf("%sreq-%d", cfg.Prefix, k),
					ModelVersion: "model-v12",
					Prompt:       "How do I reset my password on the account settings page? How do I reset my password?",
					Response:     "Open Settings, choose Security, then Reset password. Open Settings, then Security.",
					LatencyMs:    123.4,
					UserId:       "user-1234",
					SessionId:    "sess-99",
					Attributes:   map[string]string{"task_id": "support"},
				}}
			}
			evs[i] = ev
		}
		out = append(out, &pb.EventBatch{Events: evs})
	}
	return out, nil
}

func ptr[T any](v T) *T { return &v }

// Run sends the batches on one stream and waits for every ack.
func Run(ctx context.Context, cfg Config) (Result, error) {
	batches, err := Batches(cfg)
	if err != nil {
		return Result{}, err
	}
	conn, err := grpc.NewClient(cfg.Target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return Result{}, fmt.Errorf("loadgen: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := pb.NewIngestServiceClient(conn).StreamEvents(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("loadgen: open stream: %w", err)
	}

	sent := make([]time.Time, len(batches))
	var mu sync.Mutex
	res := Result{Messages: len(batches)}
	lat := make([]time.Duration, 0, len(batches))
	recvErr := make(chan error, 1)
	go func() {
		for i := range batches {
			ack, err := stream.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = fmt.Errorf("stream ended after %d of %d acks", i, len(batches))
				}
				recvErr <- err
				return
			}
			mu.Lock()
			lat = append(lat, time.Since(sent[i]))
			mu.Unlock()
			res.Accepted += int(ack.GetAccepted())
			res.Duplicates += int(ack.GetDuplicates())
			res.Rejected += len(ack.GetRejected())
		}
		recvErr <- nil
	}()

	start := time.Now()
	var interval time.Duration
	if cfg.Rate > 0 {
		interval = time.Duration(float64(cfg.Batch) / cfg.Rate * float64(time.Second))
	}
	for i, b := range batches {
		if interval > 0 {
			if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
				time.Sleep(d)
			}
		}
		mu.Lock()
		sent[i] = time.Now()
		mu.Unlock()
		if err := stream.Send(b); err != nil {
			// The reason is in the status that Recv reports.
			break
		}
	}
	if err := <-recvErr; err != nil {
		return res, fmt.Errorf("loadgen: %w", err)
	}
	res.Seconds = time.Since(start).Seconds()
	_ = stream.CloseSend()
	res.Events = res.Accepted + res.Duplicates + res.Rejected
	res.EventsPerS = float64(res.Events) / res.Seconds
	res.MsgsPerS = float64(res.Messages) / res.Seconds
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	res.AckP50 = lat[len(lat)/2]
	res.AckP99 = lat[min(len(lat)-1, len(lat)*99/100)]
	return res, nil
}
