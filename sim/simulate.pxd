# C types for the compiled build of simulate.py (setup.py); the .py runs unchanged without them.
# A cpdef method may hold no closure (generator expression, lambda): write a list comprehension.
from staircase.sim.engine cimport SimCall
from staircase.driver cimport RequestDriver

cdef class _SimPort:
    cdef public object faults, env, engines, slot_engine, lengths, on_done, placement, random_faults
    cdef public long faults_injected

    cpdef SimCall start_call(self, RequestDriver driver, object g, object node, double sent_s, long tokens_before)
