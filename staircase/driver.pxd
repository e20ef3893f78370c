cdef class CallRecord:
    cdef public object driver, generate, node, engine, handle
    cdef public double sent_s, last_end_s
    cdef public long tokens_before, prompt_tokens, cached_tokens, chunks
