; ePix10ka2M (LCLS MFX), nominal metrology written for peaknet.
; 16 modules of 352 x 384 (100 um pixels) in a slab of 5632 x 384 (module m at ss = 352 m).
; Four quads of 2 x 2 modules in a pinwheel (quad q = quad 0 rotated by 90 q degrees),
; 3 mm gaps between modules, a central hole of about 8 mm; each module slightly rotated
; in plane and tilted out of plane (fs z components, coffset). clen 0.085 m, 9.5 keV.

photon_energy = 9500 eV
clen = 0.085 m
res = 10000
adu_per_eV = 0.0147
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
peak_list = /entry_1/result_1
peak_list_type = cxi

rigid_group_q0 = p0,p1,p2,p3
rigid_group_q1 = p4,p5,p6,p7
rigid_group_q2 = p8,p9,p10,p11
rigid_group_q3 = p12,p13,p14,p15
rigid_group_collection_quads = q0,q1,q2,q3

p0/min_fs = 0
p0/max_fs = 383
p0/min_ss = 0
p0/max_ss = 351
p0/fs = +0.999998x +0.002094y +0.002000z
p0/ss = +0.002094x -0.999998y
p0/corner_x = 40.000
p0/corner_y = 714.000
p0/coffset = 0.000300

p1/min_fs = 0
p1/max_fs = 383
p1/min_ss = 352
p1/max_ss = 703
p1/fs = +0.999999x -0.001396y -0.001500z
p1/ss = -0.001396x -0.999999y
p1/corner_x = 454.000
p1/corner_y = 714.000
p1/coffset = -0.000200

p2/min_fs = 0
p2/max_fs = 383
p2/min_ss = 704
p2/max_ss = 1055
p2/fs = +1.000000x +0.000873y +0.001000z
p2/ss = +0.000873x -1.000000y
p2/corner_x = 40.000
p2/corner_y = 332.000
p2/coffset = 0.000100

p3/min_fs = 0
p3/max_fs = 383
p3/min_ss = 1056
p3/max_ss = 1407
p3/fs = +0.999997x -0.002618y +0.002500z
p3/ss = -0.002618x -0.999997y
p3/corner_x = 454.000
p3/corner_y = 332.000
p3/coffset = -0.000400

p4/min_fs = 0
p4/max_fs = 383
p4/min_ss = 1408
p4/max_ss = 1759
p4/fs = +0.001396x +0.999999y -0.001500z
p4/ss = +0.999999x -0.001396y
p4/corner_x = -714.000
p4/corner_y = 40.000
p4/coffset = -0.000200

p5/min_fs = 0
p5/max_fs = 383
p5/min_ss = 1760
p5/max_ss = 2111
p5/fs = -0.000873x +1.000000y +0.001000z
p5/ss = +1.000000x +0.000873y
p5/corner_x = -714.000
p5/corner_y = 454.000
p5/coffset = 0.000100

p6/min_fs = 0
p6/max_fs = 383
p6/min_ss = 2112
p6/max_ss = 2463
p6/fs = +0.002618x +0.999997y +0.002500z
p6/ss = +0.999997x -0.002618y
p6/corner_x = -332.000
p6/corner_y = 40.000
p6/coffset = -0.000400

p7/min_fs = 0
p7/max_fs = 383
p7/min_ss = 2464
p7/max_ss = 2815
p7/fs = -0.002094x +0.999998y +0.002000z
p7/ss = +0.999998x +0.002094y
p7/corner_x = -332.000
p7/corner_y = 454.000
p7/coffset = 0.000300

p8/min_fs = 0
p8/max_fs = 383
p8/min_ss = 2816
p8/max_ss = 3167
p8/fs = -1.000000x -0.000873y +0.001000z
p8/ss = -0.000873x +1.000000y
p8/corner_x = -40.000
p8/corner_y = -714.000
p8/coffset = 0.000100

p9/min_fs = 0
p9/max_fs = 383
p9/min_ss = 3168
p9/max_ss = 3519
p9/fs = -0.999997x +0.002618y +0.002500z
p9/ss = +0.002618x +0.999997y
p9/corner_x = -454.000
p9/corner_y = -714.000
p9/coffset = -0.000400

p10/min_fs = 0
p10/max_fs = 383
p10/min_ss = 3520
p10/max_ss = 3871
p10/fs = -0.999998x -0.002094y +0.002000z
p10/ss = -0.002094x +0.999998y
p10/corner_x = -40.000
p10/corner_y = -332.000
p10/coffset = 0.000300

p11/min_fs = 0
p11/max_fs = 383
p11/min_ss = 3872
p11/max_ss = 4223
p11/fs = -0.999999x +0.001396y -0.001500z
p11/ss = +0.001396x +0.999999y
p11/corner_x = -454.000
p11/corner_y = -332.000
p11/coffset = -0.000200

p12/min_fs = 0
p12/max_fs = 383
p12/min_ss = 4224
p12/max_ss = 4575
p12/fs = -0.002618x -0.999997y +0.002500z
p12/ss = -0.999997x +0.002618y
p12/corner_x = 714.000
p12/corner_y = -40.000
p12/coffset = -0.000400

p13/min_fs = 0
p13/max_fs = 383
p13/min_ss = 4576
p13/max_ss = 4927
p13/fs = +0.002094x -0.999998y +0.002000z
p13/ss = -0.999998x -0.002094y
p13/corner_x = 714.000
p13/corner_y = -454.000
p13/coffset = 0.000300

p14/min_fs = 0
p14/max_fs = 383
p14/min_ss = 4928
p14/max_ss = 5279
p14/fs = -0.001396x -0.999999y -0.001500z
p14/ss = -0.999999x +0.001396y
p14/corner_x = 332.000
p14/corner_y = -40.000
p14/coffset = -0.000200

p15/min_fs = 0
p15/max_fs = 383
p15/min_ss = 5280
p15/max_ss = 5631
p15/fs = +0.000873x -1.000000y +0.001000z
p15/ss = -1.000000x -0.000873y
p15/corner_x = 332.000
p15/corner_y = -454.000
p15/coffset = 0.000100
