/* intr_guard.c: EAL interrupt callbacks never run while the worker is inside a burst.
 *
 * Why: DPDK's memif PMD handles its peer's disconnect in the EAL interrupt thread, and there
 * unmaps the shared regions (memif_disconnect -> memif_free_regions) with nothing to hold off a
 * data path that is inside rte_eth_rx_burst or tx_burst on the same port.  A worker preempted
 * in a burst by that thread (likely on two cores: the interrupt thread wakes on the peer's
 * socket closing) resumes on unmapped memory and dies of SIGSEGV: a memif server killed because
 * its client left.  The PMD offers no hook (it raises no LSC event on disconnect), so this file
 * interposes the EAL's callback registration: the extension is loaded RTLD_GLOBAL by the worker
 * process (dataplane/workers/process.py), so the PMDs, dlopen()ed later by rte_eal_init, bind
 * rte_intr_callback_register and its unregister functions here.  Each callback is registered
 * with a trampoline that waits until the worker is between bursts (dpw_guard_enter/leave in
 * the loop, a Dekker pair of sequentially consistent flags: one locked instruction per loop
 * iteration, nothing per packet) and holds it off while the callback runs.
 *
 * Shims map (fn, arg) to the trampoline's argument so that an unregister by the original
 * (fn, arg), or by fn with arg (void *)-1 ("any"), finds what was registered; a full shim table
 * registers the callback unguarded (and says so once).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>

#include <rte_eal.h>
#include <rte_interrupts.h>

#include "dp_dpdk.h"

/* Worker side: the loop's flag (in a burst) and the interrupt thread's (wants the ports). */
int dpw_guard_in_burst;
int dpw_guard_paused;

struct shim {
    rte_intr_callback_fn fn;
    void *arg;
    rte_intr_unregister_callback_fn ucb;
    int refs;                   /* registrations through this shim; 0: the slot is free */
};

#define N_SHIMS 128
static struct shim shims[N_SHIMS];
static pthread_mutex_t shims_lock = PTHREAD_MUTEX_INITIALIZER;

typedef int (*register_fn)(const struct rte_intr_handle *, rte_intr_callback_fn, void *);
typedef int (*unregister_fn)(const struct rte_intr_handle *, rte_intr_callback_fn, void *);
typedef int (*pending_fn)(const struct rte_intr_handle *, rte_intr_callback_fn, void *,
                          rte_intr_unregister_callback_fn);
static struct {
    register_fn reg;
    unregister_fn unreg, unreg_sync;
    pending_fn pending;
} real;

/* The EAL's own functions: looked up in the library that defines rte_eal_init (which this
 * file does not interpose), so the answer does not depend on the global scope's order. */
static void resolve(void)
{
    Dl_info info;
    void *eal = NULL;
    if (dladdr((void *)rte_eal_init, &info) && info.dli_fname)
        eal = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    void *h = eal ? eal : RTLD_NEXT;
    real.reg = (register_fn)dlsym(h, "rte_intr_callback_register");
    real.unreg = (unregister_fn)dlsym(h, "rte_intr_callback_unregister");
    real.unreg_sync = (unregister_fn)dlsym(h, "rte_intr_callback_unregister_sync");
    real.pending = (pending_fn)dlsym(h, "rte_intr_callback_unregister_pending");
}

static void find_real(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, resolve);
}

static void trampoline(void *p)
{
    struct shim *s = p;
    __atomic_fetch_add(&dpw_guard_paused, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&dpw_guard_in_burst, __ATOMIC_SEQ_CST))
        sched_yield();   /* a burst lasts microseconds; the worker may share this core */
    s->fn(s->arg);
    __atomic_fetch_sub(&dpw_guard_paused, 1, __ATOMIC_SEQ_CST);
}

/* Called by the EAL with its own lock held: taking shims_lock here would invert the order of
 * register/unregister (shims_lock, then the EAL's), so the count drops atomically instead;
 * a slot is reused only at refs 0, after which nothing refers to it. */
static void unregistered(struct rte_intr_handle *h, void *p)
{
    struct shim *s = p;
    rte_intr_unregister_callback_fn ucb = s->ucb;
    void *arg = s->arg;
    __atomic_sub_fetch(&s->refs, 1, __ATOMIC_SEQ_CST);
    if (ucb)
        ucb(h, arg);
}

static struct shim *shim_for(rte_intr_callback_fn fn, void *arg)
{
    struct shim *free_slot = NULL;
    for (int i = 0; i < N_SHIMS; i++) {
        int refs = __atomic_load_n(&shims[i].refs, __ATOMIC_SEQ_CST);
        if (refs > 0 && shims[i].fn == fn && shims[i].arg == arg)
            return &shims[i];
        if (refs == 0 && !free_slot)
            free_slot = &shims[i];
    }
    if (free_slot) {
        free_slot->fn = fn;
        free_slot->arg = arg;
        free_slot->ucb = NULL;
    }
    return free_slot;
}

int rte_intr_callback_register(const struct rte_intr_handle *h, rte_intr_callback_fn fn,
                               void *arg)
{
    find_real();
    pthread_mutex_lock(&shims_lock);
    struct shim *s = shim_for(fn, arg);
    int rc;
    if (!s) {
        static int said;
        if (!said++)
            fprintf(stderr, "dpdk worker: interrupt guard table full, a callback runs unguarded\n");
        rc = real.reg(h, fn, arg);
    } else if ((rc = real.reg(h, trampoline, s)) == 0) {
        __atomic_add_fetch(&s->refs, 1, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&shims_lock);
    return rc;
}

/* Unregister through every shim of (fn, arg), arg (void *)-1 meaning any: the sum of what the
 * EAL removed, or its error when nothing was. */
static int unregister_with(unregister_fn f, const struct rte_intr_handle *h,
                           rte_intr_callback_fn fn, void *arg)
{
    int total = 0, err = 0, rc;
    pthread_mutex_lock(&shims_lock);
    for (int i = 0; i < N_SHIMS; i++) {
        struct shim *s = &shims[i];
        if (s->refs <= 0 || s->fn != fn || (arg != (void *)-1 && s->arg != arg))
            continue;
        if ((rc = f(h, trampoline, s)) > 0) {
            __atomic_sub_fetch(&s->refs, rc, __ATOMIC_SEQ_CST);
            total += rc;
        } else if (rc < 0) {
            err = rc;
        }
    }
    pthread_mutex_unlock(&shims_lock);
    if (total == 0 && (rc = f(h, fn, arg)) != 0)   /* registered unguarded (table full) */
        return rc;
    return total ? total : err;
}

int rte_intr_callback_unregister(const struct rte_intr_handle *h, rte_intr_callback_fn fn,
                                 void *arg)
{
    find_real();
    return unregister_with(real.unreg, h, fn, arg);
}

int rte_intr_callback_unregister_sync(const struct rte_intr_handle *h, rte_intr_callback_fn fn,
                                      void *arg)
{
    find_real();
    return unregister_with(real.unreg_sync, h, fn, arg);
}

int rte_intr_callback_unregister_pending(const struct rte_intr_handle *h,
                                         rte_intr_callback_fn fn, void *arg,
                                         rte_intr_unregister_callback_fn ucb)
{
    find_real();
    int total = 0, err = -ENOENT, rc;
    pthread_mutex_lock(&shims_lock);
    for (int i = 0; i < N_SHIMS; i++) {
        struct shim *s = &shims[i];
        if (s->refs <= 0 || s->fn != fn || (arg != (void *)-1 && s->arg != arg))
            continue;
        s->ucb = ucb;
        if ((rc = real.pending(h, trampoline, s, unregistered)) > 0)
            total += rc;   /* refs drop in unregistered(), once the EAL removed it */
        else
            err = rc;
    }
    pthread_mutex_unlock(&shims_lock);
    if (total == 0 && err == -ENOENT)
        return real.pending(h, fn, arg, ucb);
    return total ? total : err;
}

/* 1 when a PMD loaded now would bind to this file: the global scope (what dlopen(NULL)
 * searches, and what a plugin's lookup tries first) resolves the name here. */
int dpw_guard_active(void)
{
    void *global = dlopen(NULL, RTLD_LAZY);
    int on = global && dlsym(global, "rte_intr_callback_register") ==
                       (void *)rte_intr_callback_register;
    if (global)
        dlclose(global);
    return on;
}
