"""What cshare asks of the running system: /proc, mount tables, namespaces, libc.

procfs (processes, their command lines and descriptors, every mount
namespace's table), mountinfo (the one parser of /proc/PID/mountinfo),
namespaces (user and mount namespaces, /dev/fuse) and libc (the few calls
Python has no wrapper for, through ctypes).  The lowest layer: it imports
nothing else of cshare but cshare.errors, so every other folder may use it.
"""
