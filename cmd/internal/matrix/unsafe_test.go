package matrix

import "unsafe"

// unsafePointer views a netlink message's payload as its C struct.
func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
