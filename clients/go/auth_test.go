package atlassidecar

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

// logBuffer collects what an EventStream logs.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// count is the number of lines that contain s.
func (l *logBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range strings.Split(l.b.String(), "\n") {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

const refusedLine = "the sidecar refused this client"

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// closeSoon closes s without waiting long for a refused stream to deliver,
// so a failed check ends the test instead of hanging it.
func closeSoon(s *EventStream) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.Close(ctx)
}

func record(s *EventStream, n int, prefix string) {
	for i := 0; i < n; i++ {
		s.RecordInference(&pb.Inference{RequestId: fmt.Sprintf("%s-%d", prefix, i), ModelVersion: "v1", Response: "x"})
	}
}

// A refused client keeps its events and says so once, however often it
// retries; once its token is listed, the queued events are delivered
// without restarting it.
func TestEventStreamRefusedUntilTheTokenIsListed(t *testing.T) {
	cases := []struct {
		name  string
		token string // "" sends none (ATLAS_SIDECAR_TOKEN is cleared)
		// listed: the token's entry in the file before the fix (nil: none).
		listed *tokenEntry
		code   codes.Code
	}{
		{"no token", "", nil, codes.Unauthenticated},
		{"unknown token", "atls_not-listed-yet", nil, codes.Unauthenticated},
		{"token without the ingest role", "atls_reader-only", &tokenEntry{"producer", "atls_reader-only", []string{"read"}}, codes.PermissionDenied},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(TokenEnv, "")
			d := newDaemon(t)
			if tc.listed != nil {
				d.enableAuth(*tc.listed)
			} else {
				d.enableAuth()
			}
			d.start()
			var logs logBuffer
			s, err := NewEventStream(d.target(), EventStreamOptions{
				Token: tc.token, BatchSize: 5, BackoffInitial: 10 * time.Millisecond,
				BackoffMax: 100 * time.Millisecond, Logger: logs.logger(),
			})
			if err != nil {
				t.Fatal(err)
			}
			defer closeSoon(s)

			record(s, 12, "r")
			// Refused again and again: the events stay queued, the log has it once.
			waitUntil(t, "three refusals", func() bool { return s.Stats().Reconnects >= 3 })
			st := s.Stats()
			if !strings.Contains(st.LastError, "code = "+tc.code.String()) {
				t.Fatalf("last error %q, want %s", st.LastError, tc.code)
			}
			if st.AckedEvents != 0 || st.Dropped != 0 || st.Rejected != 0 || s.Pending() != 12 {
				t.Fatalf("refused, yet: %+v, pending %d", st, s.Pending())
			}
			if n := logs.count(refusedLine); n != 1 {
				t.Fatalf("refusal logged %d times, want once; log:\n%s", n, logs.String())
			}
			if !strings.Contains(logs.String(), "code="+tc.code.String()) {
				t.Fatalf("the log does not name %s:\n%s", tc.code, logs.String())
			}
			if got := d.status().GetEvents().GetAccepted(); got != 0 {
				t.Fatalf("the daemon stored %d events from a refused client", got)
			}

			if tc.token == "" {
				// Nothing to list: the events are still undelivered at close.
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				defer cancel()
				if err := s.Close(ctx); err == nil || s.Stats().Dropped != 12 {
					t.Fatalf("close: %v, stats %+v", err, s.Stats())
				}
				return
			}
			// The fix: the token listed with the ingest role. The same stream
			// delivers what it kept.
			d.writeTokens(tokenEntry{"producer", tc.token, []string{"ingest"}})
			flushOrFail(t, s, 30*time.Second)
			if st := s.Stats(); st.Accepted != 12 || st.Dropped != 0 {
				t.Fatalf("after the fix: %+v", st)
			}
			if got := d.status().GetEvents().GetAccepted(); got != 12 {
				t.Fatalf("daemon accepted %d, want 12", got)
			}
			if n := logs.count(refusedLine); n != 1 {
				t.Fatalf("refusal logged %d times after the fix, want once", n)
			}
		})
	}
}

// After an ack, a new refusal is logged again: the token was taken out of
// the file, and the next stream (the sidecar closed the idle one) is refused.
func TestEventStreamLogsARefusalAgainAfterAnAck(t *testing.T) {
	t.Setenv(TokenEnv, "")
	d := newDaemon(t)
	d.env = []string{"ATLAS_SIDECAR__INGEST__STREAM_IDLE_SECONDS=0.3"}
	d.enableAuth()
	d.start()
	var logs logBuffer
	s, err := NewEventStream(d.target(), EventStreamOptions{
		Token: testIngestToken, BackoffInitial: 10 * time.Millisecond,
		BackoffMax: 100 * time.Millisecond, Logger: logs.logger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeSoon(s)

	record(s, 3, "a")
	waitUntil(t, "a refusal", func() bool { return logs.count(refusedLine) == 1 })
	d.writeTokens(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	flushOrFail(t, s, 30*time.Second)

	d.writeTokens() // the token is revoked
	// The authorized stream was let in before; wait for the sidecar to end it as idle.
	waitUntil(t, "the idle stream to end", func() bool { return strings.Contains(s.Stats().LastError, "Unavailable") })
	record(s, 2, "b")
	waitUntil(t, "the second refusal to be logged", func() bool { return logs.count(refusedLine) == 2 })
	if st := s.Stats(); st.Accepted != 3 || s.Pending() != 2 {
		t.Fatalf("after the revocation: %+v, pending %d", st, s.Pending())
	}
	d.writeTokens(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	flushOrFail(t, s, 30*time.Second)
	if got := d.status().GetEvents().GetAccepted(); got != 5 {
		t.Fatalf("daemon accepted %d, want 5", got)
	}
}

// The token can come from ATLAS_SIDECAR_TOKEN, and DialOptions gives any
// stub the same token: GetStatus with a read token works, without one it is
// UNAUTHENTICATED, with the ingest token PERMISSION_DENIED.
func TestTokenFromTheEnvironmentAndDialOptions(t *testing.T) {
	d := newDaemon(t)
	d.enableAuth(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	d.start()

	t.Setenv(TokenEnv, testIngestToken)
	s, err := NewEventStream(d.target(), EventStreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer closeSoon(s)
	record(s, 7, "env")
	flushOrFail(t, s, 30*time.Second)
	if got := d.status().GetEvents().GetAccepted(); got != 7 {
		t.Fatalf("daemon accepted %d, want 7", got)
	}

	if _, err := d.statusWith(Security{Token: testReadToken}); err != nil {
		t.Fatalf("GetStatus with the read token: %v", err)
	}
	// The environment's ingest token has no read role.
	if _, err := d.statusWith(Security{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("GetStatus with the ingest token from the environment: %v, want PermissionDenied", err)
	}
	t.Setenv(TokenEnv, "")
	if _, err := d.statusWith(Security{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("GetStatus without a token: %v, want Unauthenticated", err)
	}
}

func TestSecurityOptions(t *testing.T) {
	t.Setenv(TokenEnv, "  from-env\n")
	if got := (Security{}).ResolvedToken(); got != "from-env" {
		t.Fatalf("token from the environment: %q", got)
	}
	if got := (Security{Token: "given"}).ResolvedToken(); got != "given" {
		t.Fatalf("a given token: %q", got)
	}
	if _, err := DialOptions(Security{TLS: &TLSConfig{CertFile: "c.pem"}}); err == nil {
		t.Fatal("a certificate without its key was taken")
	}
	if _, err := DialOptions(Security{TLS: &TLSConfig{CAFile: "/does/not/exist"}}); err == nil {
		t.Fatal("a CA file that does not exist was taken")
	}
	if _, err := NewEventStream("127.0.0.1:1", EventStreamOptions{TLS: &TLSConfig{KeyFile: "k.pem"}}); err == nil {
		t.Fatal("NewEventStream took a key without its certificate")
	}
	md, err := TokenCredentials("t0k").GetRequestMetadata(context.Background())
	if err != nil || md["authorization"] != "Bearer t0k" {
		t.Fatalf("metadata %v, %v", md, err)
	}
}

// TLS: the client that trusts the sidecar's CA connects and delivers (with a
// token, auth on); one that does not trust it fails the handshake.
func TestEventStreamOverTLS(t *testing.T) {
	d := newDaemon(t)
	f := d.enableTLS(false)
	d.enableAuth(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	d.start()

	s, err := NewEventStream(d.target(), EventStreamOptions{Token: testIngestToken, TLS: &TLSConfig{CAFile: f.ca}})
	if err != nil {
		t.Fatal(err)
	}
	defer closeSoon(s)
	record(s, 9, "tls")
	flushOrFail(t, s, 30*time.Second)
	if got := d.status().GetEvents().GetAccepted(); got != 9 {
		t.Fatalf("daemon accepted %d, want 9", got)
	}
	// localhost is on the certificate too.
	if _, err := d.statusWith(Security{Token: testReadToken, TLS: &TLSConfig{CAFile: f.ca, ServerName: "localhost"}}); err != nil {
		t.Fatalf("GetStatus with ServerName localhost: %v", err)
	}

	for name, tlsCfg := range map[string]*TLSConfig{
		"plaintext":      nil,
		"another CA":     {CAFile: f.otherCA},
		"the wrong name": {CAFile: f.ca, ServerName: "sidecar.example"},
	} {
		_, err := d.statusWith(Security{Token: testReadToken, TLS: tlsCfg})
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("%s: GetStatus answered %v, want Unavailable", name, err)
		}
	}
}

// Mutual TLS: with a client certificate the CA signed the client is let in;
// without one the handshake fails.
func TestEventStreamOverMutualTLS(t *testing.T) {
	d := newDaemon(t)
	f := d.enableTLS(true)
	d.enableAuth(tokenEntry{"producer", testIngestToken, []string{"ingest"}})
	d.start()

	s, err := NewEventStream(d.target(), EventStreamOptions{
		Token: testIngestToken, TLS: &TLSConfig{CAFile: f.ca, CertFile: f.clientCert, KeyFile: f.clientKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeSoon(s)
	record(s, 4, "mtls")
	flushOrFail(t, s, 30*time.Second)
	if got := d.status().GetEvents().GetAccepted(); got != 4 {
		t.Fatalf("daemon accepted %d, want 4", got)
	}

	_, err = d.statusWith(Security{Token: testReadToken, TLS: &TLSConfig{CAFile: f.ca}})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("GetStatus without a client certificate answered %v, want Unavailable", err)
	}
}
