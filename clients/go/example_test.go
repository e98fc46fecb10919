package atlassidecar_test

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"

	atlas "github.com/atlas-sidecar/atlas-sidecar/clients/go"
	pb "github.com/atlas-sidecar/atlas-sidecar/clients/go/atlassidecarv1"
)

// An inference server routes a request, serves it, and reports the answer
// and the user's feedback. (Compiled, not run: it needs a sidecar.)
func Example() {
	stream, err := atlas.NewEventStream("127.0.0.1:50051", atlas.EventStreamOptions{})
	if err != nil {
		panic(err)
	}
	defer stream.Close(context.Background()) // flushes what is queued

	router := atlas.NewRouter("v1")
	// On each SetTrafficSplit directive: router.Apply(d.GetSetTrafficSplit());
	// when the control stream drops: router.SidecarLost(); when it is back:
	// router.SidecarConnected().
	d := router.Route("req-1", "session-9", "")

	stream.RecordInference(&pb.Inference{
		RequestId: "req-1", ModelVersion: d.Version, Prompt: "hi", Response: "hello",
		LatencyMs: 42, SessionId: "session-9",
	})
	rating := float32(0) // a rating of 0 is a rating; leave nil when there is none
	stream.RecordFeedback(&pb.Feedback{RequestId: "req-1", Signal: pb.Signal_COPY, Rating: &rating})

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = stream.Flush(ctx) // waits for the sidecar's acks
}

// Any of the sidecar's services with the same token and TLS as an
// EventStream. (Compiled, not run: it needs a sidecar.)
func ExampleDialOptions() {
	opts, err := atlas.DialOptions(atlas.Security{
		Token: "", // empty: $ATLAS_SIDECAR_TOKEN
		TLS:   &atlas.TLSConfig{CAFile: "/etc/atlas-sidecar/tls/ca.crt"},
	})
	if err != nil {
		panic(err)
	}
	conn, err := grpc.NewClient("sidecar:50051", opts...)
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := pb.NewAdminServiceClient(conn).GetStatus(ctx, &pb.GetStatusRequest{}) // the read role
	if err != nil {
		panic(err) // UNAUTHENTICATED: no or an unknown token; PERMISSION_DENIED: no read role
	}
	fmt.Println(st.GetEvents().GetAccepted())
}

func ExampleRouter() {
	router := atlas.NewRouter("v1")
	router.Apply(&pb.SetTrafficSplit{
		Revision:      1,
		Routes:        []*pb.Route{{Version: "v1", WeightBps: 9000}, {Version: "v2", WeightBps: 1000}},
		StableVersion: "v1",
		LeaseSeconds:  30,
	})
	for _, user := range []string{"user-7", "user-4", "user-9"} {
		d := router.Route("req-1", "", user) // sticky on the user: the same answer every time
		fmt.Println(user, d.Bucket, d.Version)
	}
	// Output:
	// user-7 2581 v1
	// user-4 9180 v2
	// user-9 4371 v1
}
