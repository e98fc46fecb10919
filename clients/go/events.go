package atlassidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

// DropPolicy says which event is lost when the queue is full.
type DropPolicy int

const (
	// DropNewest refuses the event being recorded.
	DropNewest DropPolicy = iota
	// DropOldest discards the oldest queued event to make room.
	DropOldest
)

// MaxEventsPerBatch is the sidecar's default ingest.max_events_per_batch: a
// larger batch is refused whole, so batches are never cut larger than this.
const MaxEventsPerBatch = 10_000

// EventStreamOptions tunes an EventStream. Zero values take the defaults.
type EventStreamOptions struct {
	// MaxQueue bounds the events waiting to be batched (default 100000):
	// more memory buys more tolerance of a slow or absent sidecar.
	MaxQueue int
	// BatchSize is the most events per EventBatch (default 100): larger
	// batches cost the sidecar less per event. It is capped at
	// MaxEventsPerBatch.
	BatchSize int
	// MaxEventsPerBatch caps BatchSize (default MaxEventsPerBatch); keep it at
	// or below the sidecar's ingest.max_events_per_batch.
	MaxEventsPerBatch int
	// Linger is how long a partial batch waits for more events (default
	// 5 ms): longer means fuller batches, later delivery.
	Linger time.Duration
	// MaxInflightBatches bounds the batches sent and not yet acked (default
	// 256); past it the queue fills and the drop policy applies.
	MaxInflightBatches int
	// DropPolicy applies when the queue is full (default DropNewest).
	DropPolicy DropPolicy
	// BackoffInitial and BackoffMax bound the jittered wait between
	// reconnects (defaults 50 ms and 2 s).
	BackoffInitial time.Duration
	BackoffMax     time.Duration
	// Token goes on every call as "authorization: Bearer <token>". Empty:
	// the value of ATLAS_SIDECAR_TOKEN (TokenEnv); empty too: no token.
	Token string
	// TLS, when set, makes the channel TLS, mutual TLS with a client
	// certificate (the sidecar's server.tls). Nil: plaintext, for a sidecar
	// on loopback or a Unix socket.
	TLS *TLSConfig
	// Logger receives what the stream has to say on its own: a refusal
	// (UNAUTHENTICATED, PERMISSION_DENIED), once until the next ack.
	// Default slog.Default().
	Logger *slog.Logger
	// DialOptions are added after the channel's own options (Token and TLS,
	// the reconnect backoff), so they can override them.
	DialOptions []grpc.DialOption
}

func (o EventStreamOptions) withDefaults() EventStreamOptions {
	if o.MaxQueue <= 0 {
		o.MaxQueue = 100_000
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 100
	}
	if o.MaxEventsPerBatch <= 0 {
		o.MaxEventsPerBatch = MaxEventsPerBatch
	}
	o.BatchSize = min(o.BatchSize, o.MaxEventsPerBatch)
	if o.Linger <= 0 {
		o.Linger = 5 * time.Millisecond
	}
	if o.MaxInflightBatches <= 0 {
		o.MaxInflightBatches = 256
	}
	if o.BackoffInitial <= 0 {
		o.BackoffInitial = 50 * time.Millisecond
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// EventStreamStats are counters since the stream was created.
type EventStreamStats struct {
	Recorded    uint64 // events handed to Record*
	Dropped     uint64 // lost: queue full, or still undelivered at Close
	SentBatches uint64 // batches sent, resends included
	AckedEvents uint64 // events the sidecar acked as durable
	Accepted    uint64 // stored by the sidecar
	Duplicates  uint64 // already stored (a resend after a lost ack)
	Rejected    uint64 // refused by the sidecar (per event, or with their batch); never resent
	// RejectedBatches counts batches the sidecar refused whole
	// (INVALID_ARGUMENT); their events are in Rejected and were dropped.
	RejectedBatches uint64
	Reconnects      uint64
	LastError       string
}

// ErrClosed is returned by Flush after Close.
var ErrClosed = errors.New("atlassidecar: event stream closed")

// EventStream sends events to the sidecar without ever blocking the caller.
//
// RecordInference and RecordFeedback put the event on a bounded queue and
// return its event id (a UUIDv7, time ordered) at once. A background
// goroutine batches by size and linger time and streams batches over
// IngestService.StreamEvents. Batches stay in memory until the sidecar acks
// them as durable and are resent after a reconnect with the same event ids,
// so the sidecar stores each event exactly once. When the queue is full the
// drop policy applies and Stats().Dropped counts it.
//
// Rejections are permanent: rejected events, and batches the sidecar refuses
// whole with INVALID_ARGUMENT, are counted and never resent; transient
// failures (UNAVAILABLE, RESOURCE_EXHAUSTED, ...) are retried with backoff.
// A refusal of the client itself (UNAUTHENTICATED: no or an unknown token;
// PERMISSION_DENIED: a token without the ingest role) is logged once, keeps
// the events queued and is retried at BackoffMax, so a token fixed in the
// sidecar's tokens file is picked up without restarting the client.
// A stream is opened only when there is something to send, so one the
// sidecar closed for being idle comes back with the next event.
//
// All methods are safe for concurrent use.
type EventStream struct {
	opts   EventStreamOptions
	conn   *grpc.ClientConn
	client pb.IngestServiceClient

	queue chan *pb.Event
	kick  chan struct{}

	mu      sync.Mutex
	unacked []*pb.EventBatch // sent or waiting to be sent, oldest first
	sent    int              // how many of unacked went out on the current stream
	changed chan struct{}    // closed and replaced when unacked changes or pending falls
	closed  bool

	// pending counts events recorded and not yet acked or dropped. It rises
	// on the hot path without the lock; it falls only under the lock, with
	// a notification, which is all Flush needs.
	pending    atomic.Int64
	closedFlag atomic.Bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	recorded, dropped, sentBatches, ackedEvents atomic.Uint64
	accepted, duplicates, rejected, reconnects  atomic.Uint64
	rejectedBatches                             atomic.Uint64
	lastError                                   atomic.Value
	// refusedLogged is set when a refusal was logged, cleared by an ack.
	refusedLogged atomic.Bool
}

// NewEventStream connects lazily to target (host:port, or unix:path) and
// starts the background sender. It fails only on bad options (TLS files
// that cannot be read count as bad options).
func NewEventStream(target string, opts EventStreamOptions) (*EventStream, error) {
	opts = opts.withDefaults()
	dial, err := DialOptions(Security{Token: opts.Token, TLS: opts.TLS})
	if err != nil {
		return nil, err
	}
	// The channel's own reconnect backoff (1 s growing to 120 s by default)
	// would leave a restarted sidecar unused for minutes.
	dial = append(dial, grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
		BaseDelay: opts.BackoffInitial, Multiplier: 1.6, Jitter: 0.2, MaxDelay: opts.BackoffMax,
	}}))
	dial = append(dial, opts.DialOptions...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("atlassidecar: target %q: %w", target, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &EventStream{
		opts:    opts,
		conn:    conn,
		client:  pb.NewIngestServiceClient(conn),
		queue:   make(chan *pb.Event, opts.MaxQueue),
		kick:    make(chan struct{}, 1),
		changed: make(chan struct{}),
		ctx:     ctx,
		cancel:  cancel,
	}
	s.lastError.Store("")
	s.wg.Add(2)
	go s.batchLoop()
	go s.connLoop()
	return s, nil
}

// NewEventID returns a new UUIDv7 string: time ordered, so the sidecar's
// dedupe index is written in key order.
func NewEventID() string {
	id, err := uuid.NewV7()
	if err != nil { // only when the system's random source fails
		return uuid.NewString()
	}
	return id.String()
}

// RecordInference queues an Inference event and returns its event id. It
// never blocks. The message is owned by the stream afterwards.
func (s *EventStream) RecordInference(inf *pb.Inference) string {
	return s.Record(&pb.Event{Payload: &pb.Event_Inference{Inference: inf}})
}

// RecordFeedback queues a Feedback event and returns its event id. It never
// blocks. The message is owned by the stream afterwards.
func (s *EventStream) RecordFeedback(fb *pb.Feedback) string {
	return s.Record(&pb.Event{Payload: &pb.Event_Feedback{Feedback: fb}})
}

// Record queues a ready-made event, giving it an event id and a time when
// they are unset, and returns its event id. It never blocks.
func (s *EventStream) Record(ev *pb.Event) string {
	if ev.EventId == "" {
		ev.EventId = NewEventID()
	}
	if ev.Time == nil {
		ev.Time = timestamppb.Now()
	}
	s.recorded.Add(1)
	if s.closedFlag.Load() {
		s.dropped.Add(1)
		return ev.EventId
	}
	s.pending.Add(1)
	select {
	case s.queue <- ev:
		return ev.EventId
	default:
	}
	if s.opts.DropPolicy == DropOldest {
		select {
		case <-s.queue: // the oldest leaves, the new one takes its place
			s.dropped.Add(1)
			s.pending.Add(-1)
		default:
		}
		select {
		case s.queue <- ev:
			return ev.EventId
		default:
		}
	}
	s.dropped.Add(1)
	s.fallPending(1)
	return ev.EventId
}

// Pending is the number of events recorded and not yet acked or dropped.
func (s *EventStream) Pending() int {
	return int(s.pending.Load())
}

// Stats returns a snapshot of the counters.
func (s *EventStream) Stats() EventStreamStats {
	return EventStreamStats{
		Recorded:    s.recorded.Load(),
		Dropped:     s.dropped.Load(),
		SentBatches: s.sentBatches.Load(),
		AckedEvents: s.ackedEvents.Load(),
		Accepted:    s.accepted.Load(),
		Duplicates:  s.duplicates.Load(),
		Rejected:    s.rejected.Load(),
		Reconnects:  s.reconnects.Load(),
		LastError:   s.lastError.Load().(string),

		RejectedBatches: s.rejectedBatches.Load(),
	}
}

// Flush waits until every event recorded before the call is acked (or
// dropped). It returns ctx's error when ctx ends first, ErrClosed after Close.
func (s *EventStream) Flush(ctx context.Context) error {
	for {
		select {
		case s.kick <- struct{}{}:
		default:
		}
		s.mu.Lock()
		done, closed, ch := s.pending.Load() <= 0, s.closed, s.changed
		s.mu.Unlock()
		if done {
			return nil
		}
		if closed {
			return ErrClosed
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close flushes until ctx ends, then stops the background goroutines and
// the channel. Events still undelivered are counted as dropped and reported
// in the error. Safe to call twice.
func (s *EventStream) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	flushErr := s.Flush(ctx)
	s.closedFlag.Store(true)
	s.mu.Lock()
	s.closed = true
	s.notifyLocked()
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	_ = s.conn.Close()
	s.mu.Lock()
	lost := s.pending.Swap(0)
	s.mu.Unlock()
	if lost > 0 {
		s.dropped.Add(uint64(lost))
		return fmt.Errorf("atlassidecar: %d events undelivered at close: %w", lost, flushErr)
	}
	return nil
}

func (s *EventStream) fallPending(n int) {
	s.mu.Lock()
	s.pending.Add(int64(-n))
	s.notifyLocked()
	s.mu.Unlock()
}

func (s *EventStream) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// waitLocked releases the lock until something changes or the stream stops;
// it returns false when it stops.
func (s *EventStream) waitLocked(ctx context.Context) bool {
	ch := s.changed
	s.mu.Unlock()
	defer s.mu.Lock()
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		return false
	}
}

// batchLoop turns queued events into batches by size and linger time.
func (s *EventStream) batchLoop() {
	defer s.wg.Done()
	size := s.opts.BatchSize
	events := make([]*pb.Event, 0, size)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	emit := func() bool {
		if len(events) == 0 {
			return true
		}
		batch := &pb.EventBatch{Events: events}
		events = make([]*pb.Event, 0, size)
		s.mu.Lock()
		defer s.mu.Unlock()
		for len(s.unacked) >= s.opts.MaxInflightBatches {
			if !s.waitLocked(s.ctx) {
				return false
			}
		}
		s.unacked = append(s.unacked, batch)
		s.notifyLocked()
		return true
	}
	for {
		select {
		case <-s.ctx.Done():
			return
		case ev := <-s.queue:
			events = append(events, ev)
			if len(events) == 1 {
				timer.Reset(s.opts.Linger)
			}
			if len(events) >= size {
				timer.Stop()
				if !emit() {
					return
				}
			}
		case <-timer.C:
			if !emit() {
				return
			}
		case <-s.kick:
			// Flush: take what is queued now without waiting for the linger.
			for n := len(s.queue); n > 0; n-- {
				events = append(events, <-s.queue)
				if len(events) >= size && !emit() {
					return
				}
			}
			timer.Stop()
			if !emit() {
				return
			}
		}
	}
}

// connLoop keeps one StreamEvents call open, reconnecting with jittered
// exponential backoff; every (re)connect resends all unacked batches.
func (s *EventStream) connLoop() {
	defer s.wg.Done()
	delay := s.opts.BackoffInitial
	for s.ctx.Err() == nil {
		if !s.waitForWork() {
			return
		}
		gotAck, err := s.runStream()
		if s.ctx.Err() != nil {
			return
		}
		if err != nil {
			s.lastError.Store(err.Error())
		}
		if status.Code(err) == codes.InvalidArgument {
			// The oldest unacked batch is the refused one (acks come in
			// order); resending it would be refused again.
			s.dropRefused()
			gotAck = true
		}
		if gotAck {
			delay = s.opts.BackoffInitial
		}
		if code := status.Code(err); code == codes.Unauthenticated || code == codes.PermissionDenied {
			// A missing, unknown or unentitled token: say so once, keep the
			// events queued, and retry at the slowest pace until it is fixed.
			if !s.refusedLogged.Swap(true) {
				s.opts.Logger.Error("atlassidecar: the sidecar refused this client; events stay queued. "+
					"Check the token (EventStreamOptions.Token or "+TokenEnv+")",
					"code", code.String(), "error", status.Convert(err).Message(), "pending", s.Pending())
			}
			delay = s.opts.BackoffMax
		}
		s.reconnects.Add(1)
		select {
		case <-time.After(time.Duration(rand.Int64N(int64(delay) + 1))):
		case <-s.ctx.Done():
			return
		}
		delay = min(delay*2, s.opts.BackoffMax)
	}
}

// waitForWork waits until a batch is waiting to be sent; false once stopped.
func (s *EventStream) waitForWork() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.unacked) == 0 {
		if !s.waitLocked(s.ctx) {
			return false
		}
	}
	return true
}

// dropRefused counts and drops the oldest unacked batch, which the sidecar
// refused whole.
func (s *EventStream) dropRefused() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.unacked) == 0 {
		return
	}
	n := len(s.unacked[0].Events)
	s.unacked[0] = nil
	s.unacked = s.unacked[1:]
	s.rejected.Add(uint64(n))
	s.rejectedBatches.Add(1)
	s.pending.Add(int64(-n))
	s.notifyLocked()
}

// runStream runs one StreamEvents call until it fails or the stream stops.
// Acks arrive in order, one per batch, so each ack retires the oldest batch.
func (s *EventStream) runStream() (gotAck bool, err error) {
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	// WaitForReady: while the sidecar is away the call waits for the channel
	// instead of failing at once and spinning through reconnects.
	stream, err := s.client.StreamEvents(ctx, grpc.WaitForReady(true))
	if err != nil {
		return false, err
	}
	s.mu.Lock()
	s.sent = 0
	s.mu.Unlock()

	recvErr := make(chan error, 1)
	var acked atomic.Bool
	go func() {
		for {
			ack, err := stream.Recv()
			if err != nil {
				recvErr <- err
				cancel()
				return
			}
			acked.Store(true)
			s.refusedLogged.Store(false)
			s.retire(ack)
		}
	}()

	sendErr := func() error {
		for {
			s.mu.Lock()
			for s.sent >= len(s.unacked) {
				if !s.waitLocked(ctx) {
					s.mu.Unlock()
					return ctx.Err()
				}
			}
			batch := s.unacked[s.sent]
			s.sent++
			s.mu.Unlock()
			if err := stream.Send(batch); err != nil {
				return err // the real cause comes from Recv
			}
			s.sentBatches.Add(1)
		}
	}()
	cancel()
	err = <-recvErr
	if err == nil {
		err = sendErr
	}
	return acked.Load(), err
}

func (s *EventStream) retire(ack *pb.IngestAck) {
	rejected := uint64(len(ack.GetRejected())) + uint64(ack.GetRejectedUnlisted())
	s.accepted.Add(uint64(ack.GetAccepted()))
	s.duplicates.Add(uint64(ack.GetDuplicates()))
	s.rejected.Add(rejected)
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.unacked) == 0 {
		return
	}
	n := len(s.unacked[0].Events)
	s.unacked[0] = nil
	s.unacked = s.unacked[1:]
	if s.sent > 0 {
		s.sent--
	}
	s.pending.Add(int64(-n))
	s.ackedEvents.Add(uint64(n))
	s.notifyLocked()
}
