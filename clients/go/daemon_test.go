package atlassidecar

import (
	"bufio"
	"context"
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
	"google.golang.org/grpc/credentials/insecure"

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
	cmd.Env = append(os.Environ(), d.env...)
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

// status asks the daemon's AdminService.GetStatus.
func (d *daemon) status() *pb.Status {
	d.t.Helper()
	conn, err := grpc.NewClient(d.target(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		d.t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := pb.NewAdminServiceClient(conn).GetStatus(ctx, &pb.GetStatusRequest{})
	if err != nil {
		d.t.Fatalf("GetStatus: %v", err)
	}
	return st
}

func isUUIDv7(id string) bool {
	return len(id) == 36 && id[14] == '7' && strings.Count(id, "-") == 4
}
