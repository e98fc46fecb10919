package atlassidecar

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// TokenEnv is the environment variable every client and the CLI read the
// token from when none is given.
const TokenEnv = "ATLAS_SIDECAR_TOKEN"

// TLSConfig says how to reach a sidecar that serves TLS (server.tls).
type TLSConfig struct {
	// CAFile is the PEM file of the CA that signed the sidecar's certificate
	// (empty: the system's roots).
	CAFile string
	// CertFile and KeyFile are the client's certificate and key, for a
	// sidecar with server.tls.client_ca_file (mutual TLS). Both or neither.
	CertFile string
	KeyFile  string
	// ServerName is the name the sidecar's certificate is checked against,
	// when it is not the target's host.
	ServerName string
}

// Config reads the files and returns the tls.Config they describe.
func (c *TLSConfig) Config() (*tls.Config, error) {
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, errors.New("atlassidecar: TLS CertFile and KeyFile are given together")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("atlassidecar: TLS CAFile: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("atlassidecar: TLS CAFile %s: no PEM certificate in it", c.CAFile)
		}
		cfg.RootCAs = pool
	}
	if c.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("atlassidecar: TLS CertFile/KeyFile: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// Security is a token and, optionally, TLS for a channel to the sidecar.
// The zero value sends the token in ATLAS_SIDECAR_TOKEN (if any) over
// plaintext, which suits a sidecar on loopback or a Unix socket.
type Security struct {
	// Token goes on every call as "authorization: Bearer <token>". Empty:
	// the value of ATLAS_SIDECAR_TOKEN; empty too: no token.
	Token string
	// TLS, when set, makes the channel TLS (mutual TLS with CertFile and
	// KeyFile). Nil: plaintext.
	TLS *TLSConfig
}

// ResolvedToken is the token that is sent: Token, else ATLAS_SIDECAR_TOKEN,
// trimmed; empty when there is none.
func (s Security) ResolvedToken() string {
	token := s.Token
	if token == "" {
		token = os.Getenv(TokenEnv)
	}
	return strings.TrimSpace(token)
}

// DialOptions returns the options that give a grpc.ClientConn s's transport
// credentials and token, for any of the sidecar's services:
//
//	opts, err := atlassidecar.DialOptions(atlassidecar.Security{TLS: &atlassidecar.TLSConfig{CAFile: "ca.crt"}})
//	conn, err := grpc.NewClient("sidecar:50051", opts...)
//	admin := atlassidecarv1.NewAdminServiceClient(conn)
func DialOptions(s Security) ([]grpc.DialOption, error) {
	var opts []grpc.DialOption
	if s.TLS != nil {
		cfg, err := s.TLS.Config()
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if token := s.ResolvedToken(); token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(TokenCredentials(token)))
	}
	return opts, nil
}

// TokenCredentials sends token on every call as "authorization: Bearer
// <token>". It works over plaintext too (the sidecar on loopback or a Unix
// socket), so it does not require transport security.
func TokenCredentials(token string) credentials.PerRPCCredentials {
	return bearer("Bearer " + token)
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }
