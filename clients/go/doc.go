// Package atlassidecar is the Go client of atlas-sidecar: an EventStream
// that reports inferences and feedback without blocking the caller, and a
// Router that applies the traffic split the sidecar pushes, with the same
// routing rule as every other language's client.
//
// The generated protobuf and gRPC code lives in the atlassidecarv1 package.
package atlassidecar
