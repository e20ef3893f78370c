# C types for the compiled build of driver.py (setup.py); the .py runs unchanged without them.
# A cpdef method may hold no closure (generator expression, lambda): write a list comprehension.
from staircase.scheduler cimport Scheduler

cdef class RequestDriver

cdef class CallRecord:
    cdef public RequestDriver driver
    cdef public object generate, node, engine, handle
    cdef public double sent_s, last_end_s
    cdef public long tokens_before, prompt_tokens, cached_tokens, chunks

cdef class RequestDriver:
    cdef public object port, recorder, policy, request_id, prompt_id, calls, user, row
    cdef public Scheduler sched
    cdef public double arrival_s, context_tokens
    cdef public bint keep_text, done
    cdef public long prompt_tokens, cached_tokens, n_calls

    cpdef void admitted(self, CallRecord call, long prompt_tokens, long cached_tokens)
    cpdef void chunk(self, CallRecord call, long tokens, object text, double first_s, double end_s)
    cpdef void finished(self, CallRecord call, str reason, double now_s)
    cpdef void _generate(self, object g, double now)
