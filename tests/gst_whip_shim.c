/*
 * Preloaded (LD_PRELOAD) into Debian bookworm's whip-client by tests/gst_whip.py,
 * which builds it as libgupnp-igd-1.0.so.4. Two things stop that client from
 * publishing on a host that has only loopback:
 *
 * 1. It cannot start a peer connection at all. whip-client links libsoup 2,
 *    while GStreamer's webrtc plugins link libnice, which links gupnp-igd,
 *    gupnp 1.6 and so libsoup 3; libsoup 3 aborts when it finds libsoup 2 in
 *    the process ("libsoup2 symbols detected"). This library carries
 *    gupnp-igd's soname, so the loader takes it as libnice's gupnp-igd and
 *    never loads the real one. Its gupnp_simple_igd_thread_new returns NULL,
 *    which libnice treats as "UPnP unavailable"; libnice calls the other
 *    three only on a non-NULL object, but needs them to link.
 *
 * 2. libnice never gathers candidates on a loopback interface, and
 *    whip-client offers no way to name local addresses. getifaddrs here
 *    reports the IPv4 addresses of loopback as an ordinary interface's, so the
 *    client's host candidates are 127.0.0.1.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <stddef.h>
#include <sys/socket.h>

void *gupnp_simple_igd_thread_new(void) { return NULL; }
unsigned long gupnp_simple_igd_get_type(void) { return 0; }
void gupnp_simple_igd_add_port(void) {}
void gupnp_simple_igd_remove_port_local(void) {}

int getifaddrs(struct ifaddrs **list) {
    int (*real_getifaddrs)(struct ifaddrs **) = (int (*)(struct ifaddrs **))dlsym(RTLD_NEXT, "getifaddrs");
    int result = real_getifaddrs(list);
    if (result != 0)
        return result;
    for (struct ifaddrs *entry = *list; entry != NULL; entry = entry->ifa_next)
        if (entry->ifa_addr != NULL && entry->ifa_addr->sa_family == AF_INET)
            entry->ifa_flags &= ~IFF_LOOPBACK;
    return 0;
}
