# C types for the compiled build of engine.py (setup.py); the .py runs unchanged without them.
# A cpdef method may hold no closure (generator expression, lambda): write a list comprehension.
import cython
from staircase.driver cimport CallRecord

cdef class _Wake:
    cdef public list callbacks
    cdef public bint _ok
    cdef public object value

cdef class Draws:
    cdef object _dist, _rng
    cdef long _block
    cdef list _buf

    cpdef double draw(self)

cdef class SimCall(CallRecord):
    cdef public object key, shared_key, reason
    cdef public long reuse_tokens, shared_tokens, end_i, computed
    cdef public list ends
    cdef public double join_iter
    cdef public bint cancelled, open, session

cdef class SimEngine:
    cdef public object env, name, model
    cdef public Draws _prefill_noise, _decode_noise, _overhead_noise
    cdef public set batch
    cdef public list heap
    cdef public long _tie
    cdef double _base_s, _per_seq_s, _per_token_s, _overhead_s
    cdef long _kv_tokens, _block, _max_batch, _step_tokens
    cdef public double iters, context, last_t, factor, prefill_end, _decode_target
    cdef public object waiting
    cdef public object prefilling
    cdef public bint _mixed, _busy
    cdef public object _timer, _on_prefill_timer_cb, _on_decode_timer_cb
    cdef public object cache, shared_seen
    cdef public long cache_tokens, running_tokens, in_flight, iterations_scheduled, prefills
    cdef public double _acct_t, busy_s, kv_token_s
    cdef public long kv_peak
    cdef public object queue_waits

    cpdef void _open_accounts(self)
    cpdef void _account(self, double now)
    cpdef (double, double) _iteration_terms(self)
    cpdef void _advance(self, double now)
    cpdef double _generated(self, SimCall call)
    cpdef void _close(self, SimCall call)
    cpdef void _leave(self, SimCall call)
    cpdef void _remember(self, object key, long tokens)
    @cython.locals(budget=long)
    cpdef void _evict(self)
    @cython.locals(hit=long, block=long)
    cpdef long _cached_tokens(self, SimCall call)
    cpdef void _reschedule(self)
    cpdef bint _mid_iteration(self)
    @cython.locals(cached=long, call=SimCall)
    cpdef bint _start_prefill(self)
    @cython.locals(budget=long, done=long, new=long, call=SimCall, partial=SimCall)
    cpdef bint _start_chunked_prefill(self)
    @cython.locals(need=long, cached=long)
    cpdef bint _admit(self, SimCall call, bint others)
    cpdef void _time_step(self, list group, double uncached, double squares, double cross)
    cpdef void _prefill_timer(self, double duration)
    cpdef void _arm_decode_timer(self)
    cpdef void _push(self, SimCall call)
    cpdef void _prefill_done(self)
    cpdef void _boundary(self, double target)
    @cython.locals(limit=double, i=long, end=long, call=SimCall)
    cpdef void _process(self, double now)
