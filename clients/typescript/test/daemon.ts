// A real atlas-sidecar process (the Python daemon) on a loopback port, for
// integration tests.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { AdminServiceClient, type Status } from "../src/gen/atlas/sidecar/v1/admin.js";
import { channelSecurity, type SecurityOptions, type TlsOptions } from "../src/security.js";

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

/** The tokens the daemon tests use; the tokens file lists their SHA-256, never the token. */
export const INGEST_TOKEN = "atls_test-ingest-token";
export const READ_TOKEN = "atls_test-read-token";

export interface TokenEntry {
  name: string;
  token: string;
  roles: string[];
}

export const producer = (token: string, roles = ["ingest"]): TokenEntry => ({ name: "producer", token, roles });

/** PEM files made for one test: a CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a CA that signed neither. */
export interface TlsFiles {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  otherCa: string;
}

function openssl(dir: string, ...args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
}

function makeTlsFiles(dir: string): TlsFiles {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"];
  openssl(dir, "req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=atlas-sidecar test CA");
  openssl(dir, "req", "-x509", ...ec, "-keyout", "other-ca.key", "-out", "other-ca.crt", "-subj", "/CN=another CA");
  const leaf = (name: string, cn: string, ...ext: string[]): void =>
    openssl(dir, "req", "-x509", "-CA", "ca.crt", "-CAkey", "ca.key", ...ec, "-keyout", `${name}.key`, "-out", `${name}.crt`,
      "-subj", `/CN=${cn}`, "-addext", "basicConstraints=critical,CA:FALSE", ...ext.flatMap((e) => ["-addext", e]));
  leaf("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost", "extendedKeyUsage=serverAuth");
  leaf("client", "test-client", "extendedKeyUsage=clientAuth");
  const at = (f: string): string => join(dir, f);
  return {
    ca: at("ca.crt"),
    serverCert: at("server.crt"),
    serverKey: at("server.key"),
    clientCert: at("client.crt"),
    clientKey: at("client.key"),
    otherCa: at("other-ca.crt"),
  };
}

export class Daemon {
  private proc: ChildProcess | undefined;
  private readonly dir: string;
  private readonly bin: string;

  /** Added to the daemon's environment: config overrides (ATLAS_SIDECAR__SECTION__KEY). */
  env: Record<string, string> = {};

  /** Set by enableAuth: the tokens file, and the read token status() asks with. */
  private tokensPath: string | undefined;
  private readToken: string | undefined;
  /** Set by enableTls: the daemon's files, and the TLS status() dials with. */
  private serverTls: TlsFiles | undefined;
  private clientTls: TlsOptions | undefined;

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

  /** Makes the daemon read a tokens file listing `entries` (reread every 0.1 s), and status() ask with a read token. */
  enableAuth(...entries: TokenEntry[]): void {
    this.tokensPath = join(this.dir, "tokens.yaml");
    this.readToken = READ_TOKEN;
    this.writeTokens(...entries);
  }

  /**
   * (Re)writes the tokens file with `entries` and status()'s read entry. The
   * file is replaced whole (a new inode), as a Secret volume update does, so
   * the daemon sees the change.
   */
  writeTokens(...entries: TokenEntry[]): void {
    if (this.tokensPath === undefined) {
      throw new Error("enableAuth first");
    }
    const all = [{ name: "test-reader", token: this.readToken as string, roles: ["read"] }, ...entries];
    const sha = (t: string): string => createHash("sha256").update(t).digest("hex");
    const text =
      "tokens:\n" +
      all.map((e) => `  - name: ${e.name}\n    sha256: ${sha(e.token)}\n    roles: [${e.roles.join(", ")}]\n`).join("");
    writeFileSync(`${this.tokensPath}.tmp`, text, { mode: 0o600 });
    renameSync(`${this.tokensPath}.tmp`, this.tokensPath);
  }

  /**
   * Makes the daemon serve TLS with a certificate for 127.0.0.1 and localhost
   * from a CA made here (openssl); `mutual` demands a client certificate that
   * CA signed. status() trusts the CA (and presents the client certificate).
   */
  enableTls(mutual: boolean): TlsFiles {
    const files = makeTlsFiles(this.dir);
    this.serverTls = files;
    this.clientTls = mutual ? { caFile: files.ca, certFile: files.clientCert, keyFile: files.clientKey } : { caFile: files.ca };
    return files;
  }

  private daemonEnv(): Record<string, string> {
    const env = { ...this.env };
    if (this.tokensPath !== undefined) {
      env.ATLAS_SIDECAR__AUTH__TOKENS_FILE = this.tokensPath;
      env.ATLAS_SIDECAR__AUTH__RELOAD_INTERVAL_SECONDS = "0.1";
    }
    const f = this.serverTls;
    if (f !== undefined) {
      env.ATLAS_SIDECAR__SERVER__TLS__CERT_FILE = f.serverCert;
      env.ATLAS_SIDECAR__SERVER__TLS__KEY_FILE = f.serverKey;
      if (this.clientTls?.certFile !== undefined) {
        env.ATLAS_SIDECAR__SERVER__TLS__CLIENT_CA_FILE = f.ca;
      }
    }
    return env;
  }

  /** Runs the daemon and waits for its {"event": "ready"} line. */
  async start(timeoutMs = 60_000): Promise<void> {
    const log = openSync(this.logPath, "a");
    const proc = spawn(
      this.bin,
      ["serve", "--listen", this.target, "--http-listen", "", "--data-dir", join(this.dir, "data")],
      { stdio: ["ignore", "pipe", log], env: { ...process.env, ...this.daemonEnv() } },
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

  /** AdminService.GetStatus, with the read token and the CA when auth or TLS is on. */
  status(): Promise<Status> {
    return this.statusWith({ token: this.readToken ?? "", tls: this.clientTls });
  }

  /** AdminService.GetStatus on a channel made by channelSecurity(security). */
  statusWith(security: SecurityOptions): Promise<Status> {
    const sec = channelSecurity(security);
    const client = new AdminServiceClient(this.target, sec.credentials, sec.channelOptions);
    return new Promise<Status>((ok, fail) => {
      client.getStatus({}, sec.metadata(), { deadline: Date.now() + 10_000 }, (err, st) => {
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
