// Command etcd is etcd's server entry point, built from go.etcd.io/etcd/server/v3
// at the version k8s.io/kubernetes itself requires (Debian's etcd is too old for
// the watch requests kopf makes).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
