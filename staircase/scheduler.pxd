# C types for the compiled build of scheduler.py (setup.py); the .py runs unchanged without them.
# A cpdef method may hold no closure (generator expression, lambda): write a list comprehension.
import cython

cdef class _NodeState:
    cdef public object node, status, pieces, chunk_end_s, prompts, inputs
    cdef public long call, tokens, step, timer_step, call_start, call_max, call_bound, chunks, max_tokens
    cdef public bint final_call, finished, failed
    cdef public double sent_s

cdef class Scheduler:
    cdef public object policy, topology, texts, query, states, lost, policy_state, load, _source_prompt, done
    cdef public bint _adaptive_chunks

    @cython.locals(st=_NodeState)
    cpdef list on_chunk(self, str node_id, long call, long index, long tokens, object text, double now_s)
    cpdef list _on_chunk(self, _NodeState st, str node_id, long index, long tokens, object text, double now_s)
    @cython.locals(st=_NodeState)
    cpdef object view(self, str node_id, double now_s)
    @cython.locals(st=_NodeState)
    cpdef list _evaluate(self, object node_ids, double now_s, list actions=*)
    cpdef object _generate(self, _NodeState st, object view, object decision, bint final)
    cpdef tuple _call_boundaries(self, _NodeState st, long max_tokens, double now_s, bint streamed=*)
    cpdef object _next_chunk(self, _NodeState st, double now_s)
