import { readFileSync } from "node:fs";

import {
  type ChannelCredentials,
  type ClientOptions,
  credentials as grpcCredentials,
  Metadata,
} from "@grpc/grpc-js";

/** The environment variable every client and the CLI read the token from. */
export const TOKEN_ENV = "ATLAS_SIDECAR_TOKEN";

/**
 * How to reach a sidecar that serves TLS (its `server.tls`). Each file may be
 * given by path (`caFile`) or by content (`ca`); the content wins.
 */
export interface TlsOptions {
  /** PEM of the CA that signed the sidecar's certificate (none: Node's default roots). */
  ca?: string | Buffer;
  caFile?: string;
  /** The client's certificate and key, for a sidecar with `server.tls.client_ca_file` (mutual TLS). Both or neither. */
  cert?: string | Buffer;
  certFile?: string;
  key?: string | Buffer;
  keyFile?: string;
  /** The name the sidecar's certificate is checked against, when it is not the target's host. */
  serverName?: string;
}

/** A token and, optionally, TLS for a channel to the sidecar. */
export interface SecurityOptions {
  /**
   * Sent on every call as `authorization: Bearer <token>`. Default
   * `process.env.ATLAS_SIDECAR_TOKEN`; empty: no token.
   */
  token?: string;
  /** TLS (mutual TLS with a client certificate); absent: plaintext, for a sidecar on loopback or a Unix socket. */
  tls?: TlsOptions;
}

/** What a gRPC client of any of the sidecar's services needs: see `channelSecurity`. */
export interface ChannelSecurity {
  /** The token that is sent, if any. */
  readonly token: string | undefined;
  /** Channel credentials: TLS with the token as call credentials, or insecure. */
  readonly credentials: ChannelCredentials;
  /** Channel options (the server name override under TLS). */
  readonly channelOptions: Partial<ClientOptions>;
  /**
   * Metadata for one call. On a plaintext channel it carries the token
   * (grpc-js refuses call credentials there); under TLS the credentials add
   * it, and this is empty. Use a fresh one per call.
   */
  metadata(): Metadata;
}

/** `token`, else `ATLAS_SIDECAR_TOKEN`, trimmed; undefined when there is none. */
export function resolveToken(token?: string): string | undefined {
  const t = (token ?? process.env[TOKEN_ENV] ?? "").trim();
  return t === "" ? undefined : t;
}

function pem(name: string, content: string | Buffer | undefined, file: string | undefined): Buffer | null {
  if (content !== undefined) {
    return Buffer.isBuffer(content) ? content : Buffer.from(content);
  }
  if (file === undefined) {
    return null;
  }
  try {
    return readFileSync(file);
  } catch (err) {
    throw new Error(`tls.${name}File: cannot read ${file}: ${(err as Error).message}`);
  }
}

/**
 * The credentials, channel options and per-call metadata that carry
 * `options`' token and TLS, for any of the generated clients:
 *
 * ```ts
 * const sec = channelSecurity({ tls: { caFile: "ca.crt" } });
 * const admin = new admin.AdminServiceClient(target, sec.credentials, sec.channelOptions);
 * admin.getStatus({}, sec.metadata(), (err, status) => { ... });
 * ```
 */
export function channelSecurity(options: SecurityOptions = {}): ChannelSecurity {
  const token = resolveToken(options.token);
  const bearer = token === undefined ? undefined : `Bearer ${token}`;
  const tls = options.tls;
  if (tls === undefined) {
    return {
      token,
      credentials: grpcCredentials.createInsecure(),
      channelOptions: {},
      metadata(): Metadata {
        const md = new Metadata();
        if (bearer !== undefined) {
          md.set("authorization", bearer);
        }
        return md;
      },
    };
  }
  const cert = pem("cert", tls.cert, tls.certFile);
  const key = pem("key", tls.key, tls.keyFile);
  if ((cert === null) !== (key === null)) {
    throw new Error("tls: a client certificate and its key are given together (cert/certFile with key/keyFile)");
  }
  let creds = grpcCredentials.createSsl(pem("ca", tls.ca, tls.caFile), key, cert);
  if (bearer !== undefined) {
    creds = grpcCredentials.combineChannelCredentials(
      creds,
      grpcCredentials.createFromMetadataGenerator((_params, callback) => {
        const md = new Metadata();
        md.set("authorization", bearer);
        callback(null, md);
      }),
    );
  }
  return {
    token,
    credentials: creds,
    channelOptions: tls.serverName ? { "grpc.ssl_target_name_override": tls.serverName } : {},
    metadata: () => new Metadata(),
  };
}
