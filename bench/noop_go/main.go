// A do-nothing OIP (KServe v2) gRPC server in Go, the bench's floor for a round trip that no
// Python server's own costs are part of: ServerLive and ServerReady answer true, ModelInfer
// answers the prebuilt response bytes read from a file, any other method UNIMPLEMENTED.
// Requests are never parsed (a raw codec hands their bytes over as they arrived).
//
//	noop_go PORT ANSWER_FILE
package main

import (
	"log"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// frame is a message's bytes as they are on the wire.
type frame struct{ data []byte }

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)   { return v.(*frame).data, nil }
func (rawCodec) Unmarshal(b []byte, v any) error { v.(*frame).data = b; return nil }
func (rawCodec) Name() string                    { return "proto" }

// readyTrue is a ServerLiveResponse or ServerReadyResponse with field 1 (a bool) set.
var readyTrue = []byte{0x08, 0x01}

func main() {
	if len(os.Args) != 3 {
		log.Fatal("usage: noop_go PORT ANSWER_FILE")
	}
	answer, err := os.ReadFile(os.Args[2])
	if err != nil {
		log.Fatal(err)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	reply := func(method string) []byte {
		switch {
		case strings.HasSuffix(method, "/ModelInfer"):
			return answer
		case strings.HasSuffix(method, "/ServerLive"), strings.HasSuffix(method, "/ServerReady"):
			return readyTrue
		}
		return nil
	}
	handler := func(_ any, stream grpc.ServerStream) error {
		if err := stream.RecvMsg(&frame{}); err != nil {
			return err
		}
		method, _ := grpc.MethodFromServerStream(stream)
		body := reply(method)
		if body == nil {
			return status.Errorf(codes.Unimplemented, "the no-op server answers ModelInfer, ServerLive and ServerReady only, not %s", method)
		}
		return stream.SendMsg(&frame{data: body})
	}
	server := grpc.NewServer(grpc.UnknownServiceHandler(handler), grpc.ForceServerCodec(rawCodec{}))
	log.Fatal(server.Serve(listener))
}
