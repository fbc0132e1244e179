; CSPAD (LCLS CXI), nominal metrology written for peaknet.
; 64 ASICs of 185 x 194 in the Cheetah slab 1480 x 1552: quadrant q at fs = 388 q,
; 2x1 sensor s at ss = 185 s, ASIC pair a = 2s, 2s+1 side by side (3-pixel gap
; between the ASICs of a sensor in the lab). psana stack (32, 185, 388): module q*8+s.
; Quadrant q is quadrant 0 rotated by 90 q degrees about the beam; central hole about
; 100 x 100 pixels with the beam 3.2, -1.7 pixels off the hole centre.
; 110 um pixels, clen 0.1 m, 9.5 keV.

photon_energy = 9500 eV
clen = 0.100 m
coffset = 0.0
res = 9090.909091
adu_per_eV = 0.00105
max_adu = 15000
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
peak_list = /entry_1/result_1
peak_list_type = cxi

rigid_group_q0 = q0a0,q0a1,q0a2,q0a3,q0a4,q0a5,q0a6,q0a7,q0a8,q0a9,q0a10,q0a11,q0a12,q0a13,q0a14,q0a15
rigid_group_q1 = q1a0,q1a1,q1a2,q1a3,q1a4,q1a5,q1a6,q1a7,q1a8,q1a9,q1a10,q1a11,q1a12,q1a13,q1a14,q1a15
rigid_group_q2 = q2a0,q2a1,q2a2,q2a3,q2a4,q2a5,q2a6,q2a7,q2a8,q2a9,q2a10,q2a11,q2a12,q2a13,q2a14,q2a15
rigid_group_q3 = q3a0,q3a1,q3a2,q3a3,q3a4,q3a5,q3a6,q3a7,q3a8,q3a9,q3a10,q3a11,q3a12,q3a13,q3a14,q3a15
rigid_group_s0 = q0a0,q0a1
rigid_group_s1 = q0a2,q0a3
rigid_group_s2 = q0a4,q0a5
rigid_group_s3 = q0a6,q0a7
rigid_group_s4 = q0a8,q0a9
rigid_group_s5 = q0a10,q0a11
rigid_group_s6 = q0a12,q0a13
rigid_group_s7 = q0a14,q0a15
rigid_group_s8 = q1a0,q1a1
rigid_group_s9 = q1a2,q1a3
rigid_group_s10 = q1a4,q1a5
rigid_group_s11 = q1a6,q1a7
rigid_group_s12 = q1a8,q1a9
rigid_group_s13 = q1a10,q1a11
rigid_group_s14 = q1a12,q1a13
rigid_group_s15 = q1a14,q1a15
rigid_group_s16 = q2a0,q2a1
rigid_group_s17 = q2a2,q2a3
rigid_group_s18 = q2a4,q2a5
rigid_group_s19 = q2a6,q2a7
rigid_group_s20 = q2a8,q2a9
rigid_group_s21 = q2a10,q2a11
rigid_group_s22 = q2a12,q2a13
rigid_group_s23 = q2a14,q2a15
rigid_group_s24 = q3a0,q3a1
rigid_group_s25 = q3a2,q3a3
rigid_group_s26 = q3a4,q3a5
rigid_group_s27 = q3a6,q3a7
rigid_group_s28 = q3a8,q3a9
rigid_group_s29 = q3a10,q3a11
rigid_group_s30 = q3a12,q3a13
rigid_group_s31 = q3a14,q3a15
rigid_group_collection_quadrants = q0,q1,q2,q3
rigid_group_collection_sensors = s0,s1,s2,s3,s4,s5,s6,s7,s8,s9,s10,s11,s12,s13,s14,s15,s16,s17,s18,s19,s20,s21,s22,s23,s24,s25,s26,s27,s28,s29,s30,s31

q0a0/min_fs = 0
q0a0/max_fs = 193
q0a0/min_ss = 0
q0a0/max_ss = 184
q0a0/fs = +0.000000x +1.000000y
q0a0/ss = -1.000000x +0.000000y
q0a0/corner_x = 451.200
q0a0/corner_y = -29.700

q0a1/min_fs = 194
q0a1/max_fs = 387
q0a1/min_ss = 0
q0a1/max_ss = 184
q0a1/fs = +0.000000x +1.000000y
q0a1/ss = -1.000000x +0.000000y
q0a1/corner_x = 451.200
q0a1/corner_y = 167.300

q0a2/min_fs = 0
q0a2/max_fs = 193
q0a2/min_ss = 185
q0a2/max_ss = 369
q0a2/fs = +0.000000x +1.000000y
q0a2/ss = -1.000000x +0.000000y
q0a2/corner_x = 238.200
q0a2/corner_y = -29.700

q0a3/min_fs = 194
q0a3/max_fs = 387
q0a3/min_ss = 185
q0a3/max_ss = 369
q0a3/fs = +0.000000x +1.000000y
q0a3/ss = -1.000000x +0.000000y
q0a3/corner_x = 238.200
q0a3/corner_y = 167.300

q0a4/min_fs = 0
q0a4/max_fs = 193
q0a4/min_ss = 370
q0a4/max_ss = 554
q0a4/fs = -1.000000x +0.000000y
q0a4/ss = +0.000000x -1.000000y
q0a4/corner_x = 871.200
q0a4/corner_y = 366.300

q0a5/min_fs = 194
q0a5/max_fs = 387
q0a5/min_ss = 370
q0a5/max_ss = 554
q0a5/fs = -1.000000x +0.000000y
q0a5/ss = +0.000000x -1.000000y
q0a5/corner_x = 674.200
q0a5/corner_y = 366.300

q0a6/min_fs = 0
q0a6/max_fs = 193
q0a6/min_ss = 555
q0a6/max_ss = 739
q0a6/fs = -1.000000x +0.000000y
q0a6/ss = +0.000000x -1.000000y
q0a6/corner_x = 871.200
q0a6/corner_y = 155.300

q0a7/min_fs = 194
q0a7/max_fs = 387
q0a7/min_ss = 555
q0a7/max_ss = 739
q0a7/fs = -1.000000x +0.000000y
q0a7/ss = +0.000000x -1.000000y
q0a7/corner_x = 674.200
q0a7/corner_y = 155.300

q0a8/min_fs = 0
q0a8/max_fs = 193
q0a8/min_ss = 740
q0a8/max_ss = 924
q0a8/fs = +0.000000x -1.000000y
q0a8/ss = +1.000000x +0.000000y
q0a8/corner_x = 474.200
q0a8/corner_y = 789.300

q0a9/min_fs = 194
q0a9/max_fs = 387
q0a9/min_ss = 740
q0a9/max_ss = 924
q0a9/fs = +0.000000x -1.000000y
q0a9/ss = +1.000000x +0.000000y
q0a9/corner_x = 474.200
q0a9/corner_y = 592.300

q0a10/min_fs = 0
q0a10/max_fs = 193
q0a10/min_ss = 925
q0a10/max_ss = 1109
q0a10/fs = +0.000000x -1.000000y
q0a10/ss = +1.000000x +0.000000y
q0a10/corner_x = 686.200
q0a10/corner_y = 789.300

q0a11/min_fs = 194
q0a11/max_fs = 387
q0a11/min_ss = 925
q0a11/max_ss = 1109
q0a11/fs = +0.000000x -1.000000y
q0a11/ss = +1.000000x +0.000000y
q0a11/corner_x = 686.200
q0a11/corner_y = 592.300

q0a12/min_fs = 0
q0a12/max_fs = 193
q0a12/min_ss = 1110
q0a12/max_ss = 1294
q0a12/fs = -1.000000x +0.000000y
q0a12/ss = +0.000000x -1.000000y
q0a12/corner_x = 444.200
q0a12/corner_y = 769.300

q0a13/min_fs = 194
q0a13/max_fs = 387
q0a13/min_ss = 1110
q0a13/max_ss = 1294
q0a13/fs = -1.000000x +0.000000y
q0a13/ss = +0.000000x -1.000000y
q0a13/corner_x = 247.200
q0a13/corner_y = 769.300

q0a14/min_fs = 0
q0a14/max_fs = 193
q0a14/min_ss = 1295
q0a14/max_ss = 1479
q0a14/fs = -1.000000x +0.000000y
q0a14/ss = +0.000000x -1.000000y
q0a14/corner_x = 444.200
q0a14/corner_y = 556.300

q0a15/min_fs = 194
q0a15/max_fs = 387
q0a15/min_ss = 1295
q0a15/max_ss = 1479
q0a15/fs = -1.000000x +0.000000y
q0a15/ss = +0.000000x -1.000000y
q0a15/corner_x = 247.200
q0a15/corner_y = 556.300

q1a0/min_fs = 388
q1a0/max_fs = 581
q1a0/min_ss = 0
q1a0/max_ss = 184
q1a0/fs = -1.000000x +0.000000y
q1a0/ss = -0.000000x -1.000000y
q1a0/corner_x = 31.200
q1a0/corner_y = 446.300

q1a1/min_fs = 582
q1a1/max_fs = 775
q1a1/min_ss = 0
q1a1/max_ss = 184
q1a1/fs = -1.000000x +0.000000y
q1a1/ss = -0.000000x -1.000000y
q1a1/corner_x = -165.800
q1a1/corner_y = 446.300

q1a2/min_fs = 388
q1a2/max_fs = 581
q1a2/min_ss = 185
q1a2/max_ss = 369
q1a2/fs = -1.000000x +0.000000y
q1a2/ss = -0.000000x -1.000000y
q1a2/corner_x = 31.200
q1a2/corner_y = 233.300

q1a3/min_fs = 582
q1a3/max_fs = 775
q1a3/min_ss = 185
q1a3/max_ss = 369
q1a3/fs = -1.000000x +0.000000y
q1a3/ss = -0.000000x -1.000000y
q1a3/corner_x = -165.800
q1a3/corner_y = 233.300

q1a4/min_fs = 388
q1a4/max_fs = 581
q1a4/min_ss = 370
q1a4/max_ss = 554
q1a4/fs = -0.000000x -1.000000y
q1a4/ss = +1.000000x -0.000000y
q1a4/corner_x = -364.800
q1a4/corner_y = 866.300

q1a5/min_fs = 582
q1a5/max_fs = 775
q1a5/min_ss = 370
q1a5/max_ss = 554
q1a5/fs = -0.000000x -1.000000y
q1a5/ss = +1.000000x -0.000000y
q1a5/corner_x = -364.800
q1a5/corner_y = 669.300

q1a6/min_fs = 388
q1a6/max_fs = 581
q1a6/min_ss = 555
q1a6/max_ss = 739
q1a6/fs = -0.000000x -1.000000y
q1a6/ss = +1.000000x -0.000000y
q1a6/corner_x = -153.800
q1a6/corner_y = 866.300

q1a7/min_fs = 582
q1a7/max_fs = 775
q1a7/min_ss = 555
q1a7/max_ss = 739
q1a7/fs = -0.000000x -1.000000y
q1a7/ss = +1.000000x -0.000000y
q1a7/corner_x = -153.800
q1a7/corner_y = 669.300

q1a8/min_fs = 388
q1a8/max_fs = 581
q1a8/min_ss = 740
q1a8/max_ss = 924
q1a8/fs = +1.000000x -0.000000y
q1a8/ss = +0.000000x +1.000000y
q1a8/corner_x = -787.800
q1a8/corner_y = 469.300

q1a9/min_fs = 582
q1a9/max_fs = 775
q1a9/min_ss = 740
q1a9/max_ss = 924
q1a9/fs = +1.000000x -0.000000y
q1a9/ss = +0.000000x +1.000000y
q1a9/corner_x = -590.800
q1a9/corner_y = 469.300

q1a10/min_fs = 388
q1a10/max_fs = 581
q1a10/min_ss = 925
q1a10/max_ss = 1109
q1a10/fs = +1.000000x -0.000000y
q1a10/ss = +0.000000x +1.000000y
q1a10/corner_x = -787.800
q1a10/corner_y = 681.300

q1a11/min_fs = 582
q1a11/max_fs = 775
q1a11/min_ss = 925
q1a11/max_ss = 1109
q1a11/fs = +1.000000x -0.000000y
q1a11/ss = +0.000000x +1.000000y
q1a11/corner_x = -590.800
q1a11/corner_y = 681.300

q1a12/min_fs = 388
q1a12/max_fs = 581
q1a12/min_ss = 1110
q1a12/max_ss = 1294
q1a12/fs = -0.000000x -1.000000y
q1a12/ss = +1.000000x -0.000000y
q1a12/corner_x = -767.800
q1a12/corner_y = 439.300

q1a13/min_fs = 582
q1a13/max_fs = 775
q1a13/min_ss = 1110
q1a13/max_ss = 1294
q1a13/fs = -0.000000x -1.000000y
q1a13/ss = +1.000000x -0.000000y
q1a13/corner_x = -767.800
q1a13/corner_y = 242.300

q1a14/min_fs = 388
q1a14/max_fs = 581
q1a14/min_ss = 1295
q1a14/max_ss = 1479
q1a14/fs = -0.000000x -1.000000y
q1a14/ss = +1.000000x -0.000000y
q1a14/corner_x = -554.800
q1a14/corner_y = 439.300

q1a15/min_fs = 582
q1a15/max_fs = 775
q1a15/min_ss = 1295
q1a15/max_ss = 1479
q1a15/fs = -0.000000x -1.000000y
q1a15/ss = +1.000000x -0.000000y
q1a15/corner_x = -554.800
q1a15/corner_y = 242.300

q2a0/min_fs = 776
q2a0/max_fs = 969
q2a0/min_ss = 0
q2a0/max_ss = 184
q2a0/fs = -0.000000x -1.000000y
q2a0/ss = +1.000000x -0.000000y
q2a0/corner_x = -444.800
q2a0/corner_y = 26.300

q2a1/min_fs = 970
q2a1/max_fs = 1163
q2a1/min_ss = 0
q2a1/max_ss = 184
q2a1/fs = -0.000000x -1.000000y
q2a1/ss = +1.000000x -0.000000y
q2a1/corner_x = -444.800
q2a1/corner_y = -170.700

q2a2/min_fs = 776
q2a2/max_fs = 969
q2a2/min_ss = 185
q2a2/max_ss = 369
q2a2/fs = -0.000000x -1.000000y
q2a2/ss = +1.000000x -0.000000y
q2a2/corner_x = -231.800
q2a2/corner_y = 26.300

q2a3/min_fs = 970
q2a3/max_fs = 1163
q2a3/min_ss = 185
q2a3/max_ss = 369
q2a3/fs = -0.000000x -1.000000y
q2a3/ss = +1.000000x -0.000000y
q2a3/corner_x = -231.800
q2a3/corner_y = -170.700

q2a4/min_fs = 776
q2a4/max_fs = 969
q2a4/min_ss = 370
q2a4/max_ss = 554
q2a4/fs = +1.000000x -0.000000y
q2a4/ss = +0.000000x +1.000000y
q2a4/corner_x = -864.800
q2a4/corner_y = -369.700

q2a5/min_fs = 970
q2a5/max_fs = 1163
q2a5/min_ss = 370
q2a5/max_ss = 554
q2a5/fs = +1.000000x -0.000000y
q2a5/ss = +0.000000x +1.000000y
q2a5/corner_x = -667.800
q2a5/corner_y = -369.700

q2a6/min_fs = 776
q2a6/max_fs = 969
q2a6/min_ss = 555
q2a6/max_ss = 739
q2a6/fs = +1.000000x -0.000000y
q2a6/ss = +0.000000x +1.000000y
q2a6/corner_x = -864.800
q2a6/corner_y = -158.700

q2a7/min_fs = 970
q2a7/max_fs = 1163
q2a7/min_ss = 555
q2a7/max_ss = 739
q2a7/fs = +1.000000x -0.000000y
q2a7/ss = +0.000000x +1.000000y
q2a7/corner_x = -667.800
q2a7/corner_y = -158.700

q2a8/min_fs = 776
q2a8/max_fs = 969
q2a8/min_ss = 740
q2a8/max_ss = 924
q2a8/fs = +0.000000x +1.000000y
q2a8/ss = -1.000000x +0.000000y
q2a8/corner_x = -467.800
q2a8/corner_y = -792.700

q2a9/min_fs = 970
q2a9/max_fs = 1163
q2a9/min_ss = 740
q2a9/max_ss = 924
q2a9/fs = +0.000000x +1.000000y
q2a9/ss = -1.000000x +0.000000y
q2a9/corner_x = -467.800
q2a9/corner_y = -595.700

q2a10/min_fs = 776
q2a10/max_fs = 969
q2a10/min_ss = 925
q2a10/max_ss = 1109
q2a10/fs = +0.000000x +1.000000y
q2a10/ss = -1.000000x +0.000000y
q2a10/corner_x = -679.800
q2a10/corner_y = -792.700

q2a11/min_fs = 970
q2a11/max_fs = 1163
q2a11/min_ss = 925
q2a11/max_ss = 1109
q2a11/fs = +0.000000x +1.000000y
q2a11/ss = -1.000000x +0.000000y
q2a11/corner_x = -679.800
q2a11/corner_y = -595.700

q2a12/min_fs = 776
q2a12/max_fs = 969
q2a12/min_ss = 1110
q2a12/max_ss = 1294
q2a12/fs = +1.000000x -0.000000y
q2a12/ss = +0.000000x +1.000000y
q2a12/corner_x = -437.800
q2a12/corner_y = -772.700

q2a13/min_fs = 970
q2a13/max_fs = 1163
q2a13/min_ss = 1110
q2a13/max_ss = 1294
q2a13/fs = +1.000000x -0.000000y
q2a13/ss = +0.000000x +1.000000y
q2a13/corner_x = -240.800
q2a13/corner_y = -772.700

q2a14/min_fs = 776
q2a14/max_fs = 969
q2a14/min_ss = 1295
q2a14/max_ss = 1479
q2a14/fs = +1.000000x -0.000000y
q2a14/ss = +0.000000x +1.000000y
q2a14/corner_x = -437.800
q2a14/corner_y = -559.700

q2a15/min_fs = 970
q2a15/max_fs = 1163
q2a15/min_ss = 1295
q2a15/max_ss = 1479
q2a15/fs = +1.000000x -0.000000y
q2a15/ss = +0.000000x +1.000000y
q2a15/corner_x = -240.800
q2a15/corner_y = -559.700

q3a0/min_fs = 1164
q3a0/max_fs = 1357
q3a0/min_ss = 0
q3a0/max_ss = 184
q3a0/fs = +1.000000x -0.000000y
q3a0/ss = +0.000000x +1.000000y
q3a0/corner_x = -24.800
q3a0/corner_y = -449.700

q3a1/min_fs = 1358
q3a1/max_fs = 1551
q3a1/min_ss = 0
q3a1/max_ss = 184
q3a1/fs = +1.000000x -0.000000y
q3a1/ss = +0.000000x +1.000000y
q3a1/corner_x = 172.200
q3a1/corner_y = -449.700

q3a2/min_fs = 1164
q3a2/max_fs = 1357
q3a2/min_ss = 185
q3a2/max_ss = 369
q3a2/fs = +1.000000x -0.000000y
q3a2/ss = +0.000000x +1.000000y
q3a2/corner_x = -24.800
q3a2/corner_y = -236.700

q3a3/min_fs = 1358
q3a3/max_fs = 1551
q3a3/min_ss = 185
q3a3/max_ss = 369
q3a3/fs = +1.000000x -0.000000y
q3a3/ss = +0.000000x +1.000000y
q3a3/corner_x = 172.200
q3a3/corner_y = -236.700

q3a4/min_fs = 1164
q3a4/max_fs = 1357
q3a4/min_ss = 370
q3a4/max_ss = 554
q3a4/fs = +0.000000x +1.000000y
q3a4/ss = -1.000000x +0.000000y
q3a4/corner_x = 371.200
q3a4/corner_y = -869.700

q3a5/min_fs = 1358
q3a5/max_fs = 1551
q3a5/min_ss = 370
q3a5/max_ss = 554
q3a5/fs = +0.000000x +1.000000y
q3a5/ss = -1.000000x +0.000000y
q3a5/corner_x = 371.200
q3a5/corner_y = -672.700

q3a6/min_fs = 1164
q3a6/max_fs = 1357
q3a6/min_ss = 555
q3a6/max_ss = 739
q3a6/fs = +0.000000x +1.000000y
q3a6/ss = -1.000000x +0.000000y
q3a6/corner_x = 160.200
q3a6/corner_y = -869.700

q3a7/min_fs = 1358
q3a7/max_fs = 1551
q3a7/min_ss = 555
q3a7/max_ss = 739
q3a7/fs = +0.000000x +1.000000y
q3a7/ss = -1.000000x +0.000000y
q3a7/corner_x = 160.200
q3a7/corner_y = -672.700

q3a8/min_fs = 1164
q3a8/max_fs = 1357
q3a8/min_ss = 740
q3a8/max_ss = 924
q3a8/fs = -1.000000x +0.000000y
q3a8/ss = -0.000000x -1.000000y
q3a8/corner_x = 794.200
q3a8/corner_y = -472.700

q3a9/min_fs = 1358
q3a9/max_fs = 1551
q3a9/min_ss = 740
q3a9/max_ss = 924
q3a9/fs = -1.000000x +0.000000y
q3a9/ss = -0.000000x -1.000000y
q3a9/corner_x = 597.200
q3a9/corner_y = -472.700

q3a10/min_fs = 1164
q3a10/max_fs = 1357
q3a10/min_ss = 925
q3a10/max_ss = 1109
q3a10/fs = -1.000000x +0.000000y
q3a10/ss = -0.000000x -1.000000y
q3a10/corner_x = 794.200
q3a10/corner_y = -684.700

q3a11/min_fs = 1358
q3a11/max_fs = 1551
q3a11/min_ss = 925
q3a11/max_ss = 1109
q3a11/fs = -1.000000x +0.000000y
q3a11/ss = -0.000000x -1.000000y
q3a11/corner_x = 597.200
q3a11/corner_y = -684.700

q3a12/min_fs = 1164
q3a12/max_fs = 1357
q3a12/min_ss = 1110
q3a12/max_ss = 1294
q3a12/fs = +0.000000x +1.000000y
q3a12/ss = -1.000000x +0.000000y
q3a12/corner_x = 774.200
q3a12/corner_y = -442.700

q3a13/min_fs = 1358
q3a13/max_fs = 1551
q3a13/min_ss = 1110
q3a13/max_ss = 1294
q3a13/fs = +0.000000x +1.000000y
q3a13/ss = -1.000000x +0.000000y
q3a13/corner_x = 774.200
q3a13/corner_y = -245.700

q3a14/min_fs = 1164
q3a14/max_fs = 1357
q3a14/min_ss = 1295
q3a14/max_ss = 1479
q3a14/fs = +0.000000x +1.000000y
q3a14/ss = -1.000000x +0.000000y
q3a14/corner_x = 561.200
q3a14/corner_y = -442.700

q3a15/min_fs = 1358
q3a15/max_fs = 1551
q3a15/min_ss = 1295
q3a15/max_ss = 1479
q3a15/fs = +0.000000x +1.000000y
q3a15/ss = -1.000000x +0.000000y
q3a15/corner_x = 561.200
q3a15/corner_y = -245.700
