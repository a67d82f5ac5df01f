#!/usr/bin/env python3
"""A model of the scan backward's warp reduce-scatter with lane-permuted state slots
(RsLevel and state_perm in gpu/kernels/selective_scan.cu), checked against plain sums.

    python3 scripts/rs_perm_model.py     # prints, per d_state pad, a few lanes' permutations and True

Each lane holds 2 NG values, index 2 n + (0: dB, 1: dC); state n sits in slot n ^ perm(lane).
At a level whose split bit is a permuted state bit every lane keeps slots [0, half) and sends
the rest (no select); at the other levels the upper lane keeps the upper half. The model checks
that lane l ends with the warp sums of indices rs_base(l) + i, as the kernel's red[] layout
assumes. Break perm_of (return 0) and it prints False for NG >= 8.
"""
import random
def log2(x): return x.bit_length()-1
def perm_of(lane, NG):
    V=2*NG; p=0
    for lvl in range(5):
        cnt=V>>lvl
        if cnt<=1: break
        half=cnt//2
        sb=log2(half)-1   # state bit split at this level (index = 2n + isC)
        if sb>=2 and (lane>>(4-lvl))&1: p|=1<<sb
    return p
def permuted_level(lvl,V,NG):
    cnt=V>>lvl
    if cnt<=1: return False
    half=cnt//2
    return log2(half)-1>=2
def run(NG):
    V=2*NG
    vals=[[random.random() for _ in range(V)] for _ in range(32)]  # logical per lane: q=2n+isC
    phys=[]
    for l in range(32):
        pm=perm_of(l,NG)
        v=[0.0]*V
        for s in range(NG):        # slot s holds state s^pm
            n=s^pm
            for c in range(2): v[2*s+c]=vals[l][2*n+c]
        phys.append(v)
    for lvl in range(5):
        o=16>>lvl; cnt=V>>lvl
        new=[list(x) for x in phys]
        if cnt>1:
            half=cnt//2
            for l in range(32):
                up=(l&o)!=0; pl=l^o
                for i in range(half):
                    if permuted_level(lvl,V,NG):
                        keep=phys[l][i]; recv=phys[pl][i+half]
                    else:
                        keep=phys[l][i+half] if up else phys[l][i]
                        recv=phys[pl][i+half] if up else phys[pl][i]   # partner sends the other half
                    new[l][i]=keep+recv
        else:
            for l in range(32): new[l][0]=phys[l][0]+phys[l^o][0]
        phys=new
    R=max(V//32,1)
    base=lambda l: l*(V//32) if V>=32 else l//(32//V)
    ok=True
    for l in range(32):
        for i in range(R):
            q=base(l)+i
            want=sum(vals[k][q] for k in range(32))
            if abs(phys[l][i]-want)>1e-9: ok=False
    print(NG,[perm_of(l,NG) for l in range(0,32,4)],ok)
for NG in (1,2,4,8,16,32): run(NG)
