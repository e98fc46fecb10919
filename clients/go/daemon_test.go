package atlassidecar

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"

	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

// daemon is a real atlas-sidecar process (the Python daemon) on a loopback
// port, for integration tests.
type daemon struct {
	t       *testing.T
	bin     string
	port    int
	dataDir string
	logPath string
	env     []string // KEY=value pairs added to the daemon's environment (config overrides)
	cmd     *exec.Cmd

	// Set by enableAuth: the tokens file, and the read token status() uses.
	tokensPath string
	readToken  string
	// Set by enableTLS: the daemon's certificate, and what status() dials with.
	serverTLS *tlsFiles
	clientTLS *TLSConfig
}

// The tokens the daemon tests use; an entry in the tokens file is the
// token's SHA-256, never the token.
const (
	testIngestToken = "atls_test-ingest-token"
	testReadToken   = "atls_test-read-token"
)

type tokenEntry struct {
	name, token string
	roles       []string
}

func sha256Hex(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// enableAuth makes the daemon read a tokens file listing entries (reread
// every 0.1 s), and status() ask with a read token of its own.
func (d *daemon) enableAuth(entries ...tokenEntry) {
	d.t.Helper()
	d.tokensPath = filepath.Join(filepath.Dir(d.logPath), "tokens.yaml")
	d.readToken = testReadToken
	d.writeTokens(entries...)
}

// writeTokens (re)writes the tokens file with entries and the status
// reader's entry. It replaces the file whole (a new inode), as a Secret
// volume update does, so the daemon sees the change.
func (d *daemon) writeTokens(entries ...tokenEntry) {
	d.t.Helper()
	var b strings.Builder
	b.WriteString("tokens:\n")
	all := append([]tokenEntry{{name: "test-reader", token: d.readToken, roles: []string{"read"}}}, entries...)
	for _, e := range all {
		fmt.Fprintf(&b, "  - name: %s\n    sha256: %s\n    roles: [%s]\n", e.name, sha256Hex(e.token), strings.Join(e.roles, ", "))
	}
	tmp := d.tokensPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(tmp, d.tokensPath); err != nil {
		d.t.Fatal(err)
	}
}

// enableTLS makes the daemon serve TLS with a certificate for 127.0.0.1 and
// localhost from a CA made here; mutual demands a client certificate that CA
// signed. It returns the files, whose CA status() trusts.
func (d *daemon) enableTLS(mutual bool) *tlsFiles {
	d.t.Helper()
	f := makeTLSFiles(d.t, filepath.Dir(d.logPath))
	d.serverTLS = f
	d.clientTLS = &TLSConfig{CAFile: f.ca}
	if mutual {
		d.clientTLS.CertFile, d.clientTLS.KeyFile = f.clientCert, f.clientKey
	}
	return f
}

func (d *daemon) daemonEnv() []string {
	env := append([]string{}, d.env...)
	if d.tokensPath != "" {
		env = append(env,
			"ATLAS_SIDECAR__AUTH__TOKENS_FILE="+d.tokensPath,
			"ATLAS_SIDECAR__AUTH__RELOAD_INTERVAL_SECONDS=0.1")
	}
	if f := d.serverTLS; f != nil {
		env = append(env,
			"ATLAS_SIDECAR__SERVER__TLS__CERT_FILE="+f.serverCert,
			"ATLAS_SIDECAR__SERVER__TLS__KEY_FILE="+f.serverKey)
		if d.clientTLS.CertFile != "" {
			env = append(env, "ATLAS_SIDECAR__SERVER__TLS__CLIENT_CA_FILE="+f.ca)
		}
	}
	return env
}

func sidecarBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("ATLAS_SIDECAR_BIN"); bin != "" {
		return bin
	}
	bin, err := filepath.Abs(filepath.Join("..", "..", ".venv", "bin", "atlas-sidecar"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("the daemon is not installed (%v): run `make install` at the repository root, or set ATLAS_SIDECAR_BIN", err)
	}
	return bin
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func newDaemon(t *testing.T) *daemon {
	dir := t.TempDir()
	d := &daemon{
		t:       t,
		bin:     sidecarBinary(t),
		port:    freePort(t),
		dataDir: filepath.Join(dir, "data"),
		logPath: filepath.Join(dir, "daemon.log"),
	}
	t.Cleanup(d.stop)
	return d
}

func (d *daemon) target() string { return fmt.Sprintf("127.0.0.1:%d", d.port) }

// start runs the daemon and waits for its {"event": "ready"} line.
func (d *daemon) start() {
	d.t.Helper()
	logFile, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(d.bin, "serve", "--listen", d.target(), "--http-listen", "", "--data-dir", d.dataDir)
	cmd.Env = append(os.Environ(), d.daemonEnv()...)
	cmd.Stderr = logFile
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		d.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.cmd = cmd
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		signalled := false
		for sc.Scan() {
			var msg struct {
				Event string `json:"event"`
			}
			if !signalled && json.Unmarshal(sc.Bytes(), &msg) == nil && msg.Event == "ready" {
				ready <- true
				signalled = true
			}
		}
		if !signalled {
			ready <- false
		}
	}()
	select {
	case ok := <-ready:
		if !ok {
			_ = cmd.Wait()
			d.t.Fatalf("daemon exited before serving; log:\n%s", d.logTail())
		}
	case <-time.After(60 * time.Second):
		d.t.Fatalf("daemon not ready in 60 s; log:\n%s", d.logTail())
	}
}

// kill is the crash case: SIGKILL, no chance to flush or ack.
func (d *daemon) kill() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Kill()
	_ = d.cmd.Wait()
	d.cmd = nil
}

func (d *daemon) stop() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
	d.cmd = nil
}

func (d *daemon) logTail() string {
	b, _ := os.ReadFile(d.logPath)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// status asks the daemon's AdminService.GetStatus (with the read token and
// the CA when auth or TLS is on).
func (d *daemon) status() *pb.Status {
	d.t.Helper()
	st, err := d.statusWith(Security{Token: d.readToken, TLS: d.clientTLS})
	if err != nil {
		d.t.Fatalf("GetStatus: %v", err)
	}
	return st
}

// statusWith calls GetStatus on a channel made by DialOptions(sec).
func (d *daemon) statusWith(sec Security) (*pb.Status, error) {
	opts, err := DialOptions(sec)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(d.target(), opts...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return pb.NewAdminServiceClient(conn).GetStatus(ctx, &pb.GetStatusRequest{})
}

func isUUIDv7(id string) bool {
	return len(id) == 36 && id[14] == '7' && strings.Count(id, "-") == 4
}
