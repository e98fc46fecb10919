// A real atlas-sidecar process (the Python daemon) on a loopback port, for
// integration tests.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { credentials, Metadata } from "@grpc/grpc-js";

import { AdminServiceClient, type Status } from "../src/gen/atlas/sidecar/v1/admin.js";

const repoRoot = resolve(fileURLToPath(new URL("../../../..", import.meta.url)));

function sidecarBinary(): string {
  const bin = process.env.ATLAS_SIDECAR_BIN ?? join(repoRoot, ".venv", "bin", "atlas-sidecar");
  if (!existsSync(bin)) {
    throw new Error(
      `the daemon is not installed at ${bin}: run \`make install\` at the repository root, or set ATLAS_SIDECAR_BIN`,
    );
  }
  return bin;
}

export function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr !== null ? addr.port : 0;
      srv.close(() => ok(port));
    });
  });
}

export class Daemon {
  private proc: ChildProcess | undefined;
  private readonly dir: string;
  private readonly bin: string;

  /** Added to the daemon's environment: config overrides (ATLAS_SIDECAR__SECTION__KEY). */
  env: Record<string, string> = {};

  private constructor(readonly port: number) {
    this.bin = sidecarBinary();
    this.dir = mkdtempSync(join(tmpdir(), "atlas-sidecar-ts-"));
  }

  static async create(): Promise<Daemon> {
    return new Daemon(await freePort());
  }

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  private get logPath(): string {
    return join(this.dir, "daemon.log");
  }

  /** Runs the daemon and waits for its {"event": "ready"} line. */
  async start(timeoutMs = 60_000): Promise<void> {
    const log = openSync(this.logPath, "a");
    const proc = spawn(
      this.bin,
      ["serve", "--listen", this.target, "--http-listen", "", "--data-dir", join(this.dir, "data")],
      { stdio: ["ignore", "pipe", log], env: { ...process.env, ...this.env } },
    );
    closeSync(log);
    this.proc = proc;
    await new Promise<void>((ok, fail) => {
      let done = false;
      const timer = setTimeout(() => finish(new Error(`daemon not ready in ${timeoutMs} ms; log:\n${this.logTail()}`)), timeoutMs);
      const finish = (err?: Error): void => {
        if (done) {
          return;
        }
        done = true;
        clearTimeout(timer);
        if (err) {
          fail(err);
        } else {
          ok();
        }
      };
      const lines = createInterface({ input: proc.stdout! });
      lines.on("line", (line) => {
        try {
          if ((JSON.parse(line) as { event?: string }).event === "ready") {
            finish();
          }
        } catch {
          // not a JSON line
        }
      });
      proc.once("exit", (code) => finish(new Error(`daemon exited with ${code} before serving; log:\n${this.logTail()}`)));
    });
  }

  /** The crash case: SIGKILL, no chance to flush or ack. */
  async kill(): Promise<void> {
    await this.signal("SIGKILL");
  }

  async stop(): Promise<void> {
    await this.signal("SIGTERM");
  }

  /** Stops the daemon and removes its data. */
  async dispose(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  private async signal(sig: NodeJS.Signals): Promise<void> {
    const proc = this.proc;
    this.proc = undefined;
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) {
      return;
    }
    const exited = new Promise<void>((ok) => proc.once("exit", () => ok()));
    proc.kill(sig);
    const timer = setTimeout(() => proc.kill("SIGKILL"), 30_000);
    await exited;
    clearTimeout(timer);
  }

  /** AdminService.GetStatus. */
  status(): Promise<Status> {
    const client = new AdminServiceClient(this.target, credentials.createInsecure());
    return new Promise<Status>((ok, fail) => {
      client.getStatus({}, new Metadata(), { deadline: Date.now() + 10_000 }, (err, st) => {
        client.close();
        if (err) {
          fail(err);
        } else {
          ok(st);
        }
      });
    });
  }

  private logTail(): string {
    try {
      return readFileSync(this.logPath, "utf8").slice(-3000);
    } catch {
      return "";
    }
  }
}
