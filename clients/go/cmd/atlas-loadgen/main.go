// Command atlas-loadgen streams synthetic events at an atlas-sidecar and
// prints the acked rate and ack latency.
//
//	atlas-loadgen -target 127.0.0.1:50051 -events 200000 -batch 100
//	atlas-loadgen -target 127.0.0.1:50051 -events 50000 -batch 1 -json
//	atlas-loadgen -target 127.0.0.1:50051 -events 100000 -batch 100 -rate 10000
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/atlas-sidecar/atlas-sidecar/clients/go/internal/loadgen"
)

func main() {
	var cfg loadgen.Config
	flag.StringVar(&cfg.Target, "target", "127.0.0.1:50051", "the sidecar's gRPC address (host:port or unix:/path)")
	flag.IntVar(&cfg.Events, "events", 100000, "events to send in all")
	flag.IntVar(&cfg.Batch, "batch", 100, "events per EventBatch message (1: one event per message)")
	flag.Float64Var(&cfg.Rate, "rate", 0, "events per second to pace at (0: as fast as the stream allows)")
	flag.StringVar(&cfg.Prefix, "prefix", "loadgen-", "request id prefix")
	asJSON := flag.Bool("json", false, "print the result as one JSON object")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: atlas-loadgen [flags]\n\n"+
			"Streams synthetic inference and feedback events (about 340 bytes each) at an\n"+
			"atlas-sidecar on one StreamEvents call, waits for every ack, and prints the\n"+
			"acked events/s, messages/s and the p50/p99 ack latency.\n\nflags:\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	res, err := loadgen.Run(context.Background(), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "atlas-loadgen:", err)
		os.Exit(1)
	}
	if *asJSON {
		_ = json.NewEncoder(os.Stdout).Encode(res)
		return
	}
	fmt.Printf("%d events in %d messages in %.2f s: %.0f events/s, %.0f messages/s; "+
		"accepted %d, duplicates %d, rejected %d; ack p50 %s, p99 %s\n",
		res.Events, res.Messages, res.Seconds, res.EventsPerS, res.MsgsPerS,
		res.Accepted, res.Duplicates, res.Rejected, res.AckP50, res.AckP99)
}
